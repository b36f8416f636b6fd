"""The store capacity benchmark runs end to end in a tiny configuration: every store gets
figures, and the two Redis stores a server cost and the capacity derived from it. Times are not
asserted: they depend on the machine."""

from __future__ import annotations

from tests.support.processes import run_benchmark
from tests.support.redis_cluster import require_redis_cluster


def test_tiny_run_measures_every_store_and_the_redis_capacity():
    require_redis_cluster()  # the benchmark starts its own server and cluster
    report = run_benchmark("store_capacity", "--requests", "20", "--batch", "4", timeout=120)
    assert not report["truncated"]
    assert list(report["stores"]) == ["memory", "sqlite", "redis", "redis-cluster"]
    for kind, figures in report["stores"].items():
        for mode in ("sequential", "concurrent"):
            assert figures[mode]["reserve_us"] > 0 and figures[mode]["settle_us"] > 0, kind
        if kind.startswith("redis"):
            assert figures["concurrent"]["server_us"] > 0, kind
            capacity = figures["capacity_rps"]
            assert figures["gateways"] == capacity * report["busy"] / report["rate"]
        else:
            assert "capacity_rps" not in figures
