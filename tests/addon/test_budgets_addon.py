"""Budgets, limits per model and a team's window inside mitmproxy's test harness: the status
command shows every limit and budget with what is left, and QA replay decides as live does."""

from __future__ import annotations

import json

import pytest
from mitmproxy.test import tutils
from tokengate_core import notes
from tokengate_core.annotate import comment
from tokengate_core.commands import status_report
from tokengate_core.gate import Gate
from tokengate_core.quota import buckets_for
from tokengate_core.reporting import Reporting
from tokengate_core.settings import Settings

from tests.support.harness import gate_in_harness, reverse_flow, through
from tests.support.quotas import ALICE, BOB, key_entries

# 9 prompt tokens of "Hello!" at $100/1M and 100 completion tokens at $1000/1M: $0.1009 a call.
BUDGETED = (
    "  p:\n    context: /p\n    provider: mock\n"
    "    token_limits:\n      total_tokens:\n"
    "        - {count: 1000, duration: 1m}\n"
    "        - {count: 5000, duration: 1h, scope: proxy, models: [cheap-*]}\n"
    "    budgets:\n      - {usd: 0.25, duration: 1d, scope: proxy}\n"
    "    keys:\n" + key_entries(alice=ALICE, bob=BOB) + "store: {kind: memory}\n"
    "prices:\n  cheap-model: {input: 100, output: 1000}\n"
)
ANSWER = json.dumps({"usage": {"prompt_tokens": 9, "completion_tokens": 100}}).encode()
BODY = {"model": "cheap-model", "messages": [{"role": "user", "content": "Hello!"}]}


@pytest.fixture
def budgeted(tmp_path, monkeypatch):
    with gate_in_harness(
        tmp_path, monkeypatch, BUDGETED, Gate(clock=lambda: 1_000_000.0)
    ) as harnessed:
        tctx, _, addons = harnessed
        # The figures below are the tokenizer's: no cold margin for cheap-model, which tiktoken
        # does not know.
        tctx.configure(addons[0], tokengate_estimate_margin="1")
        yield harnessed


async def call(addons, key: str = ALICE) -> object:
    flow = reverse_flow(key=key, body={**BODY, "max_tokens": 100})
    await through(addons, ("requestheaders", "request"), flow)
    if not notes.answered_by_gate(flow):
        flow.response = tutils.tresp(content=ANSWER)
        await through(addons, ("responseheaders", "response"), flow)
    return flow


async def test_status_shows_every_limit_and_budget_with_what_is_left(budgeted):
    _, gate, addons = budgeted
    flow = await call(addons)
    assert flow.metadata[notes.META]["cost_micro_usd"] == 100_900
    assert flow.response.headers["X-TokenGate-Cost"] == "0.100900"
    assert comment(flow.metadata[notes.META], 200) == (
        "tokengate: p/alice cheap-model 109 tokens (reported), $0.100900; left: total_tokens-1m "
        "891, total_tokens-1h[cheap-*]@proxy 4891, usd-1d@proxy $0.149100"
    )
    report = await status_report(gate)
    assert (
        "  p (shared by all keys): total_tokens-1h[cheap-*]@proxy 109 used + 0 reserved of "
        "5000, 4891 left, whole again in 3600s; usd-1d@proxy $0.100900 used + $0.000000 "
        "reserved of $0.250000, $0.149100 left, whole again in 86400s"
    ) in report
    assert "  p/alice: total_tokens-1m 109 used + 0 reserved of 1000, 891 left" in report
    assert "  p/bob: total_tokens-1m 0 used" in report


@pytest.fixture
def ledger(budgeted, tmp_path):
    tctx, _, addons = budgeted
    (addon,) = [a for a in addons if isinstance(a, Reporting)]
    path = tmp_path / "ledger.jsonl"
    tctx.configure(addon, tokengate_ledger=str(path))
    addon.running()
    return addon, path


async def test_replay_decides_budgets_as_live_and_says_what_each_call_cost(budgeted, ledger):
    """Three calls captured under no budget: replayed under a $0.25 team budget, the third is
    lowered to what is left and a fourth refused as insufficient quota."""
    _, _, addons = budgeted
    addon, path = ledger
    for key in ("alice", "bob", "alice", "bob"):
        flow = reverse_flow(body={**BODY, "max_tokens": 100})
        flow.live = False
        saved = {"proxy": "p", "key": key, "endpoint": "chat/completions", "allowed": True}
        flow.metadata[notes.META] = saved
        flow.response = tutils.tresp(content=ANSWER)
        await through(addons, ("requestheaders", "request", "response"), flow)
    addon.done()
    lines = [json.loads(text) for text in path.read_text().splitlines()]
    assert [line["cost_usd"] for line in lines[:3]] == [0.1009, 0.1009, 0.0479]
    assert lines[2]["max_tokens_lowered_to"] == 47
    assert (lines[3]["status"], lines[3]["decision"], lines[3]["limit"]) == (
        429,
        "refused",
        "usd-1d@proxy",
    )


async def test_a_request_for_the_priority_tier_reserves_at_its_price(budgeted):
    """The table does not list cheap-model's tiers: priority is reserved at twice the price (an
    upper bound), so a budget holds what the call may cost."""
    _, gate, addons = budgeted
    flow = reverse_flow(body={**BODY, "max_tokens": 100, "service_tier": "priority"})
    await through(addons, ("requestheaders", "request"), flow)
    assert not notes.answered_by_gate(flow)
    standing = await gate.store.status(buckets_for(gate.proxy("p"), "alice"))
    budget = [s for s in standing if s.limit.dimension == "usd"]
    assert budget[0].reserved == 2 * 100_900


async def test_a_reload_applies_a_budgets_new_amount_and_models_to_what_was_spent(
    budgeted, tmp_path
):
    _, _, addons = budgeted
    await call(addons)  # $0.1009 of the team's $0.25
    quotas = tmp_path / "quotas.yaml"
    edited = quotas.read_text().replace(
        "{usd: 0.25, duration: 1d, scope: proxy}",
        "{usd: 0.15, duration: 1d, scope: proxy, models: [cheap-*]}",
    )
    quotas.write_text(edited, encoding="utf-8")
    settings = next(addon for addon in addons if isinstance(addon, Settings))
    assert await settings.reload("test")
    # $0.0491 left of the new amount: the prompt ($0.0009) and 48 completion tokens fit.
    lowered = await call(addons, BOB)
    assert lowered.metadata[notes.META]["max_tokens_lowered_to"] == 48
    refused = await call(addons)
    assert refused.response.status_code == 429
    assert "USD per 1d (usd-1d[cheap-*]@proxy) for models cheap-*" in refused.response.text
