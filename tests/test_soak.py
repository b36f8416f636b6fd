"""The soak script in a small configuration: its invariants hold (it exits 1 when one fails),
and it reports what it promises. No figure (time, memory) is asserted."""

from __future__ import annotations

from tests.e2e import run_benchmark


def test_soak_keeps_the_books_over_a_small_mixed_run():
    report = run_benchmark("soak", "--requests", "600", "--concurrency", "8", timeout=180)
    assert report["requests"] == 600 and report["failures"] == []
    outcomes = report["outcomes"]
    # The mix reached every kind of answer: served, refused by key and by budget, the provider's
    # own errors, and streams cut short.
    for status in ("200", "401 gate", "429 gate", "429", "500", "200 cut"):
        assert outcomes.get(status), outcomes
    assert sum(report["reserved_left"].values()) == 0
    assert report["ledger_tokens"] == report["mock_delivered_tokens"]
    assert all(report["ledger_tokens"].values())
    assert report["rss_kib_after_warm_up"] and report["rss_kib_at_end"]
