"""The ten-limits benchmark runs end to end in a tiny configuration: every target answers every
request 200 and has figures, and the in-process part reserves in the windows the gate builds
from each configuration. Times are not asserted: they depend on the machine."""

from __future__ import annotations

from scripts.bench.limits import TARGETS, markdown
from tests.support.processes import run_benchmark


def test_ten_limits_against_one_beside_plain_mitmdump():
    report = run_benchmark(
        "limits", "--rounds", "1", "--requests", "30", "--concurrency", "2",
        "--store-requests", "50", timeout=120,
    )  # fmt: skip
    assert set(report["targets"]) == set(TARGETS)
    for name, figures in report["targets"].items():
        assert figures["cpu_ms"] > 0 and figures["rps"] > 0, name
    assert report["targets"]["mitmdump"]["cpu_ratio"] == 1.0
    assert report["ten_vs_one"] > 0
    assert {name: f["limits"] for name, f in report["in_process"].items()} == {
        "one limit": 1,
        "ten limits": 10,
    }
    assert all(figures["both_us"] > 0 for figures in report["in_process"].values())
    assert "| ten limits | 10 |" in markdown(report)
