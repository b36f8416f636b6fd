"""Fixtures every test folder shares: the one Redis Cluster of the session."""

from __future__ import annotations

import pytest

from tests.support.redis_cluster import LocalCluster, require_redis_cluster


@pytest.fixture(scope="session")
def redis_cluster_session():
    """Started on first use, stopped at the end of the session; tests empty it as they need."""
    cluster = LocalCluster(*require_redis_cluster(), masters=3, replicas=1).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster(redis_cluster_session):
    """The session's cluster, emptied, with every node up and agreeing it is ok."""
    redis_cluster_session.wait_ok()
    redis_cluster_session.flush()
    return redis_cluster_session
