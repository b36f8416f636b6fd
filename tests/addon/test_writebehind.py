"""Settlements handed to the store behind the answer: the answer does not wait for a slow store,
each settlement lands exactly once, the next decision and usage reads see it, and shutdown
writes it before the store closes."""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy.test import tutils
from tokengate_core.quota import buckets_for
from tokengate_core.settings import Settings
from tokengate_core.stores.memory import MemoryStore
from tokengate_core.writebehind import WriteBehind

from tests.support.harness import reverse_flow, through

USAGE = json.dumps({"usage": {"prompt_tokens": 9, "completion_tokens": 91}}).encode()


class SlowSettleStore(MemoryStore):
    """The memory store, whose settlements wait until the test lets them through."""

    def __init__(self, clock) -> None:
        super().__init__(clock)
        self.gate_open = asyncio.Event()
        self.settled: list[str] = []
        self.closed_after: list[str] | None = None

    async def settle(self, reservation, usage):
        await self.gate_open.wait()
        self.settled.append(reservation.id)
        return await super().settle(reservation, usage)

    async def close(self) -> None:
        self.closed_after = list(self.settled)


def slow_store(gate) -> SlowSettleStore:
    gate.store = SlowSettleStore(gate.clock)
    return gate.store


async def test_answer_leaves_while_the_settlement_waits_and_it_lands_once(gate_addons):
    _, gate, addons = gate_addons
    store = slow_store(gate)
    flow = reverse_flow()
    await through(addons, ("requestheaders", "request"), flow)
    flow.response = tutils.tresp(content=USAGE)
    await through(addons, ("responseheaders", "response"), flow)  # returns: nothing to wait for
    assert gate.writes.pending == 1 and store.settled == []
    # The headers are those of the settled books, computed from the admission's windows.
    assert flow.response.headers["X-Tokens-Consumed"] == "100"
    assert flow.response.headers["X-RateLimit-Remaining"] == "900"

    following = reverse_flow()
    decided = asyncio.ensure_future(through(addons, ("requestheaders", "request"), following))
    await asyncio.sleep(0.05)
    assert not decided.done()  # the next decision waits for the settlement handed over before
    store.gate_open.set()
    await decided
    assert store.settled == [flow.id]
    (status,) = await gate.store.status(buckets_for(gate.proxy("p"), "alice"))
    assert (status.used, status.reserved) == (100, 9 + 256)  # the first settled once, second held


async def test_usage_query_sees_the_settlement_of_an_answered_request(gate_addons):
    _, gate, addons = gate_addons
    store = slow_store(gate)
    flow = reverse_flow()
    await through(addons, ("requestheaders", "request"), flow)
    flow.response = tutils.tresp(content=USAGE)
    await through(addons, ("responseheaders", "response"), flow)
    query = reverse_flow(path="/p/tokengate/usage")
    query.request.method = "GET"
    asked = asyncio.ensure_future(through(addons, ("requestheaders",), query))
    await asyncio.sleep(0.02)
    store.gate_open.set()
    await asked
    [limit] = json.loads(query.response.content)["limits"]
    assert (limit["used"], limit["reserved"]) == (100, 0)


async def test_shutdown_writes_pending_settlements_before_closing_the_store(gate_addons):
    _, gate, addons = gate_addons
    store = slow_store(gate)
    flows = [reverse_flow() for _ in range(3)]
    for flow in flows:
        await through(addons, ("requestheaders", "request"), flow)
    for flow in flows:
        flow.response = tutils.tresp(content=USAGE)
        await through(addons, ("responseheaders", "response"), flow)
    (settings,) = [addon for addon in addons if isinstance(addon, Settings)]
    closing = asyncio.ensure_future(settings.done())
    await asyncio.sleep(0.02)
    assert store.closed_after is None  # still waiting for the settlements
    store.gate_open.set()
    await closing
    assert sorted(store.closed_after) == sorted(flow.id for flow in flows)  # all of them, once


async def test_a_failing_write_is_logged_and_does_not_stop_the_others(caplog):
    writes = WriteBehind()
    done: list[int] = []

    async def broken():
        raise ValueError("bug")

    async def fine(n: int):
        done.append(n)

    writes.hand_over(lambda: fine(1))
    writes.hand_over(broken)
    writes.hand_over(lambda: fine(2))
    await writes.caught_up()
    assert done == [1, 2] and writes.pending == 0
    assert "a store write failed" in caplog.text


async def test_caught_up_waits_only_for_what_was_handed_over_before_it():
    writes = WriteBehind()
    release = [asyncio.Event() for _ in range(2)]
    writes.hand_over(release[0].wait)
    waiting = asyncio.ensure_future(writes.caught_up())
    await asyncio.sleep(0)  # it has started waiting
    writes.hand_over(release[1].wait)  # handed over later: not waited for
    release[0].set()
    await asyncio.wait_for(waiting, 5)
    assert writes.pending == 1
    release[1].set()
    await writes.caught_up()
    assert writes.pending == 0


@pytest.mark.parametrize("eager", [False, True], ids=["lazy-tasks", "eager-tasks"])
async def test_writes_keep_flowing_with_eager_tasks_and_writes_that_never_wait(eager):
    """mitmproxy sets asyncio's eager task factory: a runner whose writes never suspend (the
    memory store) finishes inside create_task. Later writes must still start a runner."""
    loop = asyncio.get_running_loop()
    if eager:
        loop.set_task_factory(asyncio.eager_task_factory)
    try:
        writes = WriteBehind()
        done: list[int] = []

        async def write(n: int):
            done.append(n)

        for batch in range(3):
            for n in range(4):
                writes.hand_over(lambda n=batch * 4 + n: write(n))
            await asyncio.wait_for(writes.caught_up(), 5)
        assert done == list(range(12)) and writes.pending == 0
    finally:
        loop.set_task_factory(None)
