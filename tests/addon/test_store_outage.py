"""A usage store that goes away: `fail: closed` answers 503, `fail: open` admits and says so,
and settlements made meanwhile are written once the store is back (books stay exact)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from mitmproxy.test import tutils
from tokengate_core import notes
from tokengate_core.accounting import Accounting
from tokengate_core.answers import SOURCE_HEADER
from tokengate_core.config import load_config
from tokengate_core.gate import Gate
from tokengate_core.limiter import Demand, Usage
from tokengate_core.metering import DEGRADED_HEADER
from tokengate_core.quota import buckets_for
from tokengate_core.settings import Settings
from tokengate_core.stores import StoreUnavailable
from tokengate_core.stores.memory import MemoryStore

from tests.support.harness import gate_in_harness, reverse_flow, through
from tests.support.processes import PROVIDER_KEY, write_quotas
from tests.support.quotas import ALICE, key_entries

NOW = 1_000_000.0
HELLO_BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello!"}]}


def proxies(fail: str) -> str:
    return (
        f"  p:\n    context: /p\n    provider: mock\n    fail: {fail}\n"
        "    token_limits:\n      total_tokens:\n        - {count: 1000, duration: 1m}\n"
        "    keys:\n" + key_entries(alice=ALICE) + "store: {kind: memory}\n"
    )


class FlakyStore(MemoryStore):
    """The memory store behind a switch, as a store whose server went away would behave."""

    def __init__(self, clock) -> None:
        super().__init__(clock)
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("connection refused")

    async def reserve(self, *args):
        self._check()
        return await super().reserve(*args)

    async def settle(self, *args):
        self._check()
        return await super().settle(*args)

    async def release(self, *args):
        self._check()
        return await super().release(*args)

    async def status(self, *args):
        self._check()
        return await super().status(*args)


@pytest.fixture(params=["closed", "open"])
def outage(request, tmp_path, monkeypatch):
    with gate_in_harness(
        tmp_path, monkeypatch, proxies(request.param), Gate(clock=lambda: NOW)
    ) as (_, gate, addons):
        gate.store = FlakyStore(gate.clock)
        yield request.param, gate, addons


def answered(usage_total: int):
    body = {"usage": {"prompt_tokens": 9, "completion_tokens": usage_total - 9}}
    return tutils.tresp(content=json.dumps(body).encode())


async def test_store_down_at_admission(outage, caplog):
    fail, gate, addons = outage
    gate.store.down = True
    caplog.set_level(logging.WARNING, "tokengate")
    flows = [reverse_flow() for _ in range(3)]
    for flow in flows:
        await through(addons, ("requestheaders", "request"), flow)
    if fail == "closed":
        for flow in flows:
            assert flow.response.status_code == 503
            assert flow.response.headers[SOURCE_HEADER] == "gateway"
            assert flow.response.headers["Retry-After"] == "2"
            error = json.loads(flow.response.content)["error"]
            assert error["code"] == "quota_store_unavailable"
            assert "not sent" in error["message"]
    else:
        for flow in flows:
            assert flow.response is None  # admitted: forwarded to the provider unmetered
            flow.response = answered(30)
            await through(addons, ("responseheaders", "response"), flow)
            assert flow.response.headers[DEGRADED_HEADER] == "degraded"
            assert flow.request.headers["authorization"] != f"Bearer {ALICE}"
    # One outage, one log line, however many requests it touched.
    assert [r.message for r in caplog.records].count(
        "tokengate: usage store unavailable: connection refused"
    ) == 1


async def test_settlement_during_outage_is_written_when_the_store_returns(outage, caplog):
    _, gate, addons = outage
    buckets = buckets_for(gate.proxy("p"), "alice")
    flow = reverse_flow()
    await through(addons, ("requestheaders", "request"), flow)
    gate.store.down = True  # goes away while the provider is answering
    flow.response = answered(100)
    await through(addons, ("responseheaders", "response"), flow)
    assert flow.response.status_code == 200
    assert flow.response.headers["X-Tokens-Consumed"] == "100"
    await gate.writes.caught_up()  # the settlement was tried (and kept) while the store was down
    gate.store.down = False
    (held,) = await gate.store.status(buckets)
    assert held.used == 0 and held.reserved > 0  # the reservation is still held meanwhile

    caplog.set_level(logging.WARNING, "tokengate")
    later = reverse_flow()
    await through(addons, ("requestheaders", "request"), later)
    assert later.response is None
    assert any("full accounting resumed" in r.message for r in caplog.records)
    await gate.writes.caught_up()  # the settlements handed over
    (status,) = await gate.store.status(buckets)
    assert status.used == 100  # the late settlement, exactly once
    later.response = answered(20)
    await through(addons, ("responseheaders", "response"), later)
    await gate.writes.caught_up()  # the settlements handed over
    (status,) = await gate.store.status(buckets)
    assert (status.used, status.reserved) == (120, 0)
    assert notes.of(later)["usage"]["total_tokens"] == 20


async def test_release_during_outage_is_written_when_the_store_returns(outage):
    _, gate, addons = outage
    buckets = buckets_for(gate.proxy("p"), "alice")
    failed = reverse_flow()
    await through(addons, ("requestheaders", "request"), failed)
    gate.store.down = True
    failed.response = tutils.tresp(status_code=500, content=b"{}")
    await through(addons, ("responseheaders", "response"), failed)
    await gate.writes.caught_up()  # the release was tried (and kept) while the store was down
    gate.store.down = False
    flow = reverse_flow()
    await through(addons, ("requestheaders", "request"), flow)
    flow.response = answered(10)
    await through(addons, ("responseheaders", "response"), flow)
    await gate.writes.caught_up()  # the settlements handed over
    (status,) = await gate.store.status(buckets)
    assert (status.used, status.reserved) == (10, 0)  # the failed call cost nothing


class LostReplyStore(MemoryStore):
    """A store whose first reserve runs but whose reply never arrives: what a Redis that stalled
    past the client's timeout and then woke does."""

    def __init__(self, clock) -> None:
        super().__init__(clock)
        self.replies_lost = 1

    async def reserve(self, *args):
        result = await super().reserve(*args)
        if self.replies_lost:
            self.replies_lost -= 1
            raise StoreUnavailable("Timeout reading from 127.0.0.1:6379", maybe_applied=True)
        return result


async def test_a_reserve_whose_reply_was_lost_is_released_when_the_store_answers_again(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("TOKENGATE_TEST_PROVIDER_KEY", PROVIDER_KEY)
    gate = Gate(store=LostReplyStore(lambda: NOW))
    accounting = Accounting(gate)
    quotas = write_quotas(tmp_path / "quotas.yaml", "http://upstream.test:8000", proxies("closed"))
    bucket = buckets_for(load_config(quotas).proxies["p"], "alice")
    with pytest.raises(StoreUnavailable):
        await accounting.reserve("lost", bucket, Demand(10, 10))
    await gate.writes.caught_up()  # the settlements handed over
    (held,) = await gate.store.status(bucket)
    assert held.reserved == 20  # it did run: the gate just never heard so
    decision, reservation = await accounting.reserve("next", bucket, Demand(10, 10))
    assert decision.admitted
    await accounting.settle(reservation, None)
    await gate.writes.caught_up()  # the settlements handed over
    (status,) = await gate.store.status(bucket)
    assert (status.used, status.reserved) == (0, 0)  # the lost reserve holds nothing


async def test_status_command_answers_while_the_store_is_down(outage, caplog):
    _, gate, addons = outage
    gate.store.down = True
    caplog.set_level(logging.INFO, "tokengate")
    (commands,) = [addon for addon in addons if isinstance(addon, Settings)]
    commands.status()
    for _ in range(200):
        if "usage store unavailable: connection refused" in caplog.text:
            break
        await asyncio.sleep(0.01)
    assert "tokengate status:" in caplog.text
    assert "usage store unavailable: connection refused" in caplog.text


async def test_first_decision_after_an_outage_sees_the_settlements_kept_meanwhile(outage):
    """A kept settlement is written before the next reserve is decided, not after it."""
    _, gate, addons = outage
    big = reverse_flow(body={**HELLO_BODY, "max_tokens": 900})
    await through(addons, ("requestheaders", "request"), big)  # holds 9 + 900 of 1000
    gate.store.down = True
    big.response = answered(20)
    await through(addons, ("responseheaders", "response"), big)
    await gate.writes.caught_up()  # kept: the store is down
    gate.store.down = False
    after = reverse_flow(body={**HELLO_BODY, "max_tokens": 500})
    await through(addons, ("requestheaders", "request"), after)
    assert after.response is None  # 980 free once the kept settlement is written
    assert json.loads(after.request.content)["max_tokens"] == 500  # and not lowered to 91


async def test_a_reload_to_another_store_settles_flows_in_flight_in_the_old_one(outage):
    _, gate, addons = outage
    buckets = buckets_for(gate.proxy("p"), "alice")
    old_store = gate.store
    flow = reverse_flow()
    await through(addons, ("requestheaders", "request"), flow)
    quotas = gate.config.path
    quotas.write_text(quotas.read_text().replace("store: {kind: memory}", "store: {kind: sqlite}"))
    settings = next(addon for addon in addons if isinstance(addon, Settings))
    assert await settings.reload("test")
    assert gate.store is not old_store
    flow.response = answered(30)
    await through(addons, ("responseheaders", "response"), flow)
    await gate.writes.caught_up()  # the settlements handed over
    (status,) = await old_store.status(buckets)
    assert (status.used, status.reserved) == (30, 0)  # settled where it was reserved
    # Only the reservation timeout changed: the same store keeps serving, with the new timeout.
    quotas.write_text(
        quotas.read_text().replace(
            "store: {kind: sqlite}", "store: {kind: sqlite, reservation_timeout: 2m}"
        )
    )
    current = gate.store
    assert await settings.reload("test")
    assert gate.store is current and current.stale_after == 120


class YieldingStore(FlakyStore):
    """Settles after a pause, as a store on another thread or server does: calls interleave."""

    async def settle(self, *args):
        await asyncio.sleep(0)
        return await super().settle(*args)


async def test_kept_settlements_written_by_concurrent_calls_are_each_written_once(outage):
    _, gate, _ = outage
    gate.store = YieldingStore(gate.clock)
    accounting = Accounting(gate)
    buckets = buckets_for(gate.proxy("p"), "alice")
    held = []
    for n in range(4):
        _, reservation = await accounting.reserve(f"r{n}", buckets, Demand(10, 10))
        held.append(reservation)
    gate.store.down = True
    for reservation in held[:3]:
        assert await accounting.settle(reservation, Usage(5, 5)) is None  # kept
    gate.store.down = False
    # Two calls at once each write kept settlements first: none may be written twice while
    # another is dropped.
    await asyncio.gather(
        accounting.settle(held[3], Usage(1, 1)), accounting.reserve("r9", buckets, Demand(0, 0))
    )
    (status,) = await gate.store.status(buckets)
    assert status.used == 3 * 10 + 2
