"""The latency benchmark runs end to end and reports every figure; timings themselves are not
asserted, since they depend on the machine."""

from __future__ import annotations

from tests.e2e import run_benchmark

RATIOS = ("latency_ratio", "throughput_ratio", "added_p50_ms")


def test_tiny_run_reports_every_target():
    tiny = ["--requests", "20", "--rounds", "1", "--max-seconds", "25"]
    report = run_benchmark("bench_latency", *tiny, timeout=29)
    assert report["rounds"] == 1 and not report["truncated"]
    targets = report["targets"]
    assert set(targets) == {"direct", "mitmdump", "tokengate"}
    for name, figures in targets.items():
        assert figures["samples"] == 20, name
        for key in ("p50_ms", "p99_ms", "rps", "latency_ratio", "throughput_ratio"):
            assert figures[key] > 0, (name, key)
        assert all(isinstance(figures[key], float) for key in RATIOS), name
    assert targets["mitmdump"]["latency_ratio"] == targets["mitmdump"]["throughput_ratio"] == 1
    assert targets["mitmdump"]["added_p50_ms"] == 0
    assert targets["mitmdump"]["startup_ms"] > 0 and targets["tokengate"]["startup_ms"] > 0
    assert targets["direct"]["startup_ms"] is None
