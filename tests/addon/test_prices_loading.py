"""Prices inside the gate. A configuration with a budget has the bundled price table imported
on a thread as it is installed, and a budgeted request that comes before the import is done
waits for it off the event loop: the loop never pays the import (0.3-0.6 s). Here the import is
made slow on purpose, so that a wait on the loop would show as a stalled heartbeat. Without a
budget, `prices:` alone prices a call."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import pytest
from tokengate_core import notes, prices
from tokengate_core.dialects import OPENAI
from tokengate_core.limiter import Demand
from tokengate_core.prices import Price
from tokengate_core.quota import Ask

from tests.support.harness import gate_in_harness, reverse_flow, through
from tests.support.quotas import ALICE, key_entries

SLOW = 0.8  # seconds the table's import takes in these tests
# gpt-4o-mini has no `prices:` entry: its price comes from the bundled table.
BUDGETED = (
    "  p:\n    context: /p\n    provider: mock\n"
    "    budgets:\n      - {usd: 100, duration: 1d}\n"
    "    keys:\n" + key_entries(alice=ALICE) + "store: {kind: memory}\n"
)
UNBUDGETED = (
    "  p:\n    context: /p\n    provider: mock\n"
    "    token_limits:\n      total_tokens:\n        - {count: 1000, duration: 1m}\n"
    "    keys:\n" + key_entries(alice=ALICE) + "store: {kind: memory}\n"
    'prices:\n  "llama-*": {input: 1, output: 2}\n'
)
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 9}


@pytest.fixture
def importers(monkeypatch) -> list[threading.Thread]:
    """The threads that import the table (made slow), from a state where it is not imported."""
    monkeypatch.setattr(prices, "_LOADED", threading.Event())
    original, seen = prices._table, []

    def slow_table():
        if not prices._LOADED.is_set():
            seen.append(threading.current_thread())
            time.sleep(SLOW)
        return original()

    monkeypatch.setattr(prices, "_table", slow_table)
    return seen


async def test_a_budgeted_request_right_after_the_configuration_waits_off_the_loop(
    tmp_path, monkeypatch, importers
):
    loop = asyncio.get_running_loop()
    gaps = [0.0]

    async def heartbeat() -> None:
        last = loop.time()
        while True:
            await asyncio.sleep(0.01)
            gaps.append(loop.time() - last)
            last = loop.time()

    beating = asyncio.create_task(heartbeat())
    try:
        with gate_in_harness(tmp_path, monkeypatch, BUDGETED) as (_, _, addons):
            flow = reverse_flow(body=BODY)
            await through(addons, ("requestheaders", "request"), flow)
            held = addons[2].quota.holding(flow.id)
            addons[2].quota.settle(flow.id, None)
    finally:
        beating.cancel()
    assert not notes.answered_by_gate(flow), flow.response and flow.response.text
    assert held is not None and held.price is not None and held.price.input > 0
    assert importers and threading.main_thread() not in importers, importers
    assert max(gaps) < SLOW / 2, max(gaps)


async def test_installing_a_budget_imports_the_table_before_any_request(
    tmp_path, monkeypatch, importers
):
    with gate_in_harness(tmp_path, monkeypatch, BUDGETED):
        for _ in range(100):
            if prices._LOADED.is_set():
                break
            await asyncio.sleep(0.05)
    assert prices._LOADED.is_set()
    assert [thread.name for thread in importers] == ["tokengate-prices"]


async def test_without_a_budget_prices_come_from_prices_alone(tmp_path, monkeypatch, importers):
    """A gate without a budget prices a call from `prices:` (its globs too), for the cost
    header, and never asks the table."""
    with gate_in_harness(tmp_path, monkeypatch, UNBUDGETED) as (_, gate, addons):
        ask = Ask("flow", gate.proxy("p"), "alice", Demand(1, 1), OPENAI, model="llama-3-70b")
        assert await addons[2].quota.price(ask) == Price.usd(1, 2)
        assert await addons[2].quota.price(replace(ask, model="gpt-4o")) is None
    assert not importers and not prices._LOADED.is_set()
