"""Redis for tests: where `redis-server` is not installed, tests skip with a loud reason, except
under CI (`CI` set), which must install it: there they fail."""

from __future__ import annotations

import os
import shutil

import pytest

from scripts.bench.redis_server import RedisServer

__all__ = ["RedisServer", "require_redis_server"]


def require_redis_server() -> str:
    """The path of redis-server, or a skip (a failure under CI) saying how to install it."""
    path = shutil.which("redis-server")
    if path is None:
        reason = "redis-server is not installed (apt-get install redis-server): Redis store tests"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} cannot run, and CI must run them")
        pytest.skip(f"{reason} SKIPPED")
    return path
