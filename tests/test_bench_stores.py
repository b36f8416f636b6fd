"""The store benchmark runs end to end and reports every store; timings are not asserted."""

from __future__ import annotations

from tests.e2e import run_benchmark
from tests.redis_server import require_redis_server


def test_tiny_run_reports_every_store():
    require_redis_server()
    tiny = ["--requests", "20", "--rounds", "2", "--concurrency", "4", "--max-seconds", "25"]
    report = run_benchmark("bench_stores", *tiny, timeout=40)
    assert report["rounds"] == 2 and not report["truncated"]
    for mode in ("sequential", "concurrent"):
        stores = report["stores"][mode]
        assert set(stores) == {"memory", "sqlite", "redis"}
        assert stores["memory"]["ratio_to_memory"] == 1
        for kind, figures in stores.items():
            assert figures["us_per_request"] > 0 and figures["ratio_to_memory"] > 0, kind
