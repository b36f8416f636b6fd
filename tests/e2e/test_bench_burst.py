"""The burst benchmark runs end to end in a tiny configuration. Times are not asserted; the books
are: the gate settles what the provider served, and `max_tokens` bursts never overspend."""

from __future__ import annotations

from tests.support.processes import run_benchmark


def test_tiny_run_reports_every_scenario():
    tiny = ["--requests", "6", "--limit", "150", "--provider-seconds", "0.1"]
    report = run_benchmark("bench_burst", *tiny, "--max-seconds", "50", timeout=60)
    assert not report["truncated"]
    rows = report["scenarios"]
    assert len(rows) == 8
    assert {(r["max_tokens"], r["stream"], r["queue_wait"]) for r in rows} == {
        (m, s, q) for m in (True, False) for s in (True, False) for q in (True, False)
    }
    for row in rows:
        assert row["admitted"] + row["refused"] == 6, row
        assert row["settled"] == row["served"], row  # exact books, streams included
        if row["max_tokens"]:
            # 150 / 59 per request: two whole, the third lowered to what was left.
            assert (row["admitted"], row["overshoot"]) == (3, 0), row
        else:
            # Each reserve takes all that is left (9 + 256 > 150), so one request is in flight at
            # a time; the worst is a third admitted on the last 32 (9 + 23) that produces 59.
            assert row["overshoot"] <= 50 - 23, row
