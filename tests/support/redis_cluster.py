"""A local Redis Cluster for tests: three masters with a replica each, started once per test
session (tests/conftest.py). Where `redis-server` or `redis-cli` is missing, tests skip with a
loud reason, except under CI (`CI` set), which must install them: there they fail."""

from __future__ import annotations

import os
import shutil

import pytest

from scripts.bench.redis_cluster import LocalCluster

__all__ = ["LocalCluster", "require_redis_cluster"]


def require_redis_cluster() -> tuple[str, str]:
    """The paths of redis-server and redis-cli, or a skip (a failure under CI) saying how to
    install them."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        reason = (
            "redis-server and redis-cli are not both installed (apt-get install redis-server "
            "redis-tools): Redis Cluster tests"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason} cannot run, and CI must run them")
        pytest.skip(f"{reason} SKIPPED")
    return server, cli
