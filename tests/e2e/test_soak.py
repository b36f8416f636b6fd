"""The soak script in a small configuration: its invariants hold (it exits 1 when one fails),
and it reports what it promises. No figure (time, memory) is asserted."""

from __future__ import annotations

import re

from tests.support.processes import run_benchmark


def test_soak_keeps_the_books_over_a_small_mixed_run():
    report = run_benchmark(
        "soak", "--requests", "600", "--concurrency", "8", "--baseline", timeout=180
    )
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
    # The baseline sent the same requests through plain mitmdump: nothing refused, memory read.
    plain = report["baseline"]
    assert plain["requests"] == 600 and not any("gate" in o for o in plain["outcomes"])
    assert plain["outcomes"].get("200") and plain["outcomes"].get("500")
    assert plain["rss_kib_after_warm_up"] and plain["rss_kib_at_end"]


def test_memtrace_names_what_the_gate_holds_after_warm_up(tmp_path):
    out = tmp_path / "trace.txt"
    report = run_benchmark(
        "soak", "--requests", "100", "--concurrency", "4", "--memtrace", str(out), timeout=180
    )
    assert report["failures"] == []
    trace = out.read_text(encoding="utf-8")
    assert re.search(r"flows ended: 10 at warm-up, (9|10)\d at the last snapshot", trace), trace
    assert "client connections:" in trace and "server connections:" in trace
    # Allocations are traced from warm-up on and attributed: TokenGate's own code allocates
    # on every governed flow, so it is named.
    assert "  tokengate_core " in trace
    assert "tracebacks still held" in trace and "/tokengate_core/" in trace
