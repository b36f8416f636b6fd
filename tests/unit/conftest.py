"""Fixtures of the unit tests: a real redis-server for the store conformance suite."""

from __future__ import annotations

import pytest

from tests.support.redis_server import RedisServer, require_redis_server


@pytest.fixture(scope="session")
def redis_server():
    """One redis-server for the session; tests keep apart by key prefix."""
    server = RedisServer(require_redis_server()).start()
    yield server
    server.stop()
