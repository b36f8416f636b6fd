"""End to end: a gate with budgets writes what each call cost to its ledger, exactly, and
`tokengate-report` sums the spend per proxy, key and model and charts each budget as it stood."""

from __future__ import annotations

import json
import subprocess
import sys

from tokengate_core.limiter import Usage
from tokengate_core.prices import Price, PriceBook, cost
from tokengate_core.tools.report import parse_time

from tests.support.calls import HELLO, call
from tests.support.processes import ROOT, Gateway, write_quotas
from tests.support.quotas import ALICE, BOB, proxy_yaml

PRICES = "prices:\n  gpt-4o-mini: {input: 0.15, cached_input: 0.075, output: 0.60}\n"
BUDGETS = (
    "    budgets:\n      - {usd: 1, duration: 1d}\n      - {usd: 5, duration: 30d, scope: proxy}\n"
)


def test_the_ledger_costs_each_call_and_the_report_sums_the_spend(tmp_path, fresh_mock):
    quotas = write_quotas(
        tmp_path / "quotas.yaml", fresh_mock.url, proxy_yaml(count=100_000, extra=BUDGETS)
    )
    quotas.write_text(PRICES + quotas.read_text(), encoding="utf-8")
    ledger = tmp_path / "ledger.jsonl"
    gateway = Gateway.start(
        quotas, f"reverse:{fresh_mock.url}", "--set", f"tokengate_ledger={ledger}"
    )
    try:
        answers = [
            call(gateway, ALICE),
            call(gateway, ALICE, body={**HELLO, "max_tokens": 7}),
            call(gateway, BOB, body={**HELLO, "model": "gpt-4o"}),  # the bundled table's price
            call(gateway, BOB, body={**HELLO, "model": "no-such-model"}),  # no price: refused
        ]
    finally:
        gateway.stop()
    assert [answer.status_code for answer in answers] == [200, 200, 200, 403]
    lines = [json.loads(text) for text in ledger.read_text().splitlines()]
    assert len(lines) == 4
    book = PriceBook({"gpt-4o-mini": Price.usd("0.15", "0.60", cached_input="0.075")})
    spent = {}
    for line, answer in zip(lines[:3], answers, strict=False):
        usage = Usage(
            line["prompt_tokens"],
            line["completion_tokens"],
            line["cached_prompt_tokens"],
            line["cache_write_tokens"],
            line["reasoning_tokens"],
        )
        micro = cost(usage, book.price(line["model"], at=parse_time(line["time"])))
        assert micro > 0 and round(line["cost_usd"] * 1_000_000) == micro, line
        assert answer.headers["X-TokenGate-Cost"] == f"0.{micro:06d}"  # the same figure
        assert {"usd-1d", "usd-30d@proxy"} <= set(line["limits"])
        spent[(line["key"], line["model"])] = spent.get((line["key"], line["model"]), 0) + micro
    assert "cost_usd" not in lines[3] and lines[3]["decision"] == "forbidden"

    report = [sys.executable, str(ROOT / "scripts" / "report.py"), str(ledger)]
    out = subprocess.run(
        [*report, "--json"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    summary = json.loads(out)
    alice, bob = spent[("alice", "gpt-4o-mini")], spent[("bob", "gpt-4o")]
    assert round(summary["totals"]["cost_usd"] * 1_000_000) == alice + bob
    assert summary["spend"] == {  # (dicts compare without order)
        "proxy": {"rate-limited-proxy": (alice + bob) / 1_000_000},
        "key": {
            "rate-limited-proxy/alice": alice / 1_000_000,
            "rate-limited-proxy/bob": bob / 1_000_000,
        },
        "model": {"gpt-4o-mini": alice / 1_000_000, "gpt-4o": bob / 1_000_000},
    }
    png = tmp_path / "spend.png"
    drawn = subprocess.run(
        [*report, "--png", str(png)], check=True, capture_output=True, text=True, timeout=120
    )
    assert "3 chart(s)" in drawn.stderr  # the token limit and both budgets
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (total,) = [text for text in drawn.stdout.splitlines() if text.startswith("all ")]
    assert f"0.{alice + bob:06d}" in total.split()
