"""The learned-estimates burst benchmark runs end to end in a tiny configuration: every rule,
cold and warm; where the provider counts a fixed share above or below the tokenizer, the warm
burst never overspends."""

from __future__ import annotations

from tests.support.processes import run_benchmark


def test_tiny_run_reports_every_rule_cold_and_warm():
    tiny = ["--requests", "6", "--limit", "1200", "--warmup", "8", "--provider-seconds", "0.1"]
    report = run_benchmark("bench_estimates", *tiny, "--max-seconds", "50", timeout=60)
    assert not report["truncated"]
    rows = {(row["rule"], row["phase"]): row for row in report["scenarios"]}
    assert set(rows) == {
        (rule, phase)
        for rule in ("scale:1.10", "scale:0.90", "chars:2")
        for phase in ("cold", "warm")
    }
    for (rule, phase), row in rows.items():
        assert row["admitted"] + row["refused"] == 6, row
        assert row["admitted"] >= 1, row
        if phase == "warm":
            assert row["factor"] is not None, row
            if rule.startswith("scale"):
                assert row["overshoot"] <= 0, row
                assert abs(row["factor"] - float(rule.split(":")[1])) < 0.03, row
