"""Shared fixtures: the real mock provider and Redis processes, and caller keys for quotas files."""

from __future__ import annotations

import pytest
from tokengate_core.keys import hash_key

from tests.e2e import Mock
from tests.redis_server import RedisServer, require_redis_server

ALICE = "tg-alice-secret-key"
BOB = "tg-bob-secret-key"


def key_entries(indent: int = 6, **keys: str) -> str:
    """YAML lines for `keys:` entries, name -> secret."""
    pad = " " * indent
    return "".join(
        f'{pad}{name}: {{sha256: "{hash_key(secret)}"}}\n' for name, secret in keys.items()
    )


@pytest.fixture(scope="session")
def mock():
    server = Mock.start()
    yield server
    server.process.stop()


@pytest.fixture
def fresh_mock(mock):
    mock.reset()
    return mock


@pytest.fixture(scope="session")
def redis_server():
    """One redis-server for the session; tests keep apart by key prefix."""
    server = RedisServer(require_redis_server()).start()
    yield server
    server.stop()
