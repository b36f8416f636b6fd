"""The limiter's guarantees (design.md, "Limits and windows"), driven with a fake clock.

The pure functions (`decide`, `fits_at`, `status_of`, `most_restrictive`, `seconds_until`) and the
memory store's async API (reserve / settle / release / status) are checked against figures worked
out by hand, and a hypothesis state machine compares the store with a tiny independent model of
the windows (a list of charges per limit) on random traces.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import itertools
import math
from dataclasses import dataclass, replace
from fractions import Fraction
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from tokengate_core.config import REQUESTS, Limit
from tokengate_core.limiter import (
    BUDGET,
    SLOTS,
    Bucket,
    Charge,
    Demand,
    LimitStatus,
    Rates,
    Usage,
    decide,
    fits_at,
    held_back_by_reservations,
    merged,
    most_restrictive,
    seconds_until,
    settled_view,
    slot_of,
    status_of,
    whole_number,
)
from tokengate_core.quota import buckets_for
from tokengate_core.stores import Reservation
from tokengate_core.stores.memory import MemoryStore

from tests.support.limits import T0, FakeClock, buckets, limit, total

_ids = itertools.count()


def rid() -> str:
    return f"r{next(_ids)}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> MemoryStore:
    return MemoryStore(clock=clock)


async def status_by_name(store: MemoryStore, bs: tuple[Bucket, ...]) -> dict[str, LimitStatus]:
    return {s.limit.name: s for s in await store.status(bs)}


async def charge(
    store: MemoryStore, bs: tuple[Bucket, ...], demand: Demand, usage: Usage
) -> Reservation:
    """Reserve (must be admitted) and settle at once: one finished request."""
    decision, reservation = await store.reserve(rid(), bs, demand)
    assert decision.admitted, decision
    assert reservation is not None
    await store.settle(reservation, usage)
    return reservation


# --------------------------------------------------------------------------------------------
# G1 sequential


async def test_g1_admits_while_anything_left_and_caps_completion(store, clock):
    bs = buckets(total(100))
    decision, reservation = await store.reserve(rid(), bs, Demand(10, 256))
    assert decision.admitted
    assert decision.reserved == Usage(10, 90)  # completion capped by what is left
    assert reservation is not None and reservation.amounts == Usage(10, 90)
    assert reservation.stamp == T0
    (st_,) = decision.statuses
    assert (st_.used, st_.reserved, st_.remaining) == (0, 100, 0)

    # The reservation holds everything: even a one-token prompt is refused.
    decision2, res2 = await store.reserve(rid(), bs, Demand(1, 0))
    assert not decision2.admitted and res2 is None
    assert decision2.blocking is not None and decision2.blocking.limit == total(100)
    assert decision2.retry_at == T0 + 60

    # Settled for less: the rest is free again for the next request.
    clock.advance(1)
    await store.settle(reservation, Usage(10, 20))
    (st_,) = await store.status(bs)
    assert (st_.used, st_.reserved, st_.remaining) == (30, 0, 70)

    # A prompt exactly as large as what is left is admitted, with no room for completion.
    decision3, res3 = await store.reserve(rid(), bs, Demand(70, 256))
    assert decision3.admitted and decision3.reserved == Usage(70, 0)
    await store.release(res3)

    # One token more than is left: the prompt alone cannot fit.
    decision4, _ = await store.reserve(rid(), bs, Demand(71, 0))
    assert not decision4.admitted
    assert decision4.retry_at == T0 + 60


async def test_g1_small_quota_still_admits(store):
    bs = buckets(total(5))
    decision, _ = await store.reserve(rid(), bs, Demand(3, 4096))
    assert decision.admitted and decision.reserved == Usage(3, 2)


async def test_g1_refused_only_when_nothing_left(store):
    bs = buckets(total(100))
    await charge(store, bs, Demand(10, 10), Usage(40, 59))  # 99 used, 1 left
    decision, res = await store.reserve(rid(), bs, Demand(1, 500))
    assert decision.admitted and decision.reserved == Usage(1, 0)
    await store.settle(res, Usage(1, 0))
    decision, _ = await store.reserve(rid(), bs, Demand(0, 0))  # nothing left at all
    assert not decision.admitted
    assert decision.blocking.remaining == 0


def test_g1_decide_pure_matches_g1_rule():
    lim = total(100)
    bucket = Bucket("b", lim)
    for held in range(0, 130, 7):
        charges = [Charge(T0 - 5, held, settled=True)]
        for prompt in (0, 1, 20, 50, 99, 100, 101):
            decision = decide([(bucket, charges)], Demand(prompt, 30), T0)
            left = max(0, 100 - held)
            assert decision.admitted == (left >= max(1, prompt)), (held, prompt)
            if decision.admitted:
                assert decision.reserved == Usage(prompt, min(30, left - prompt))


def test_g1_completion_cap_across_dimensions():
    prompt_lim = limit("prompt_tokens", 50, 60)
    comp_lim = limit("completion_tokens", 40, 60)
    tot_lim = total(100)
    windows = [
        (Bucket("p", prompt_lim), [Charge(T0, 45, False)]),
        (Bucket("c", comp_lim), [Charge(T0, 25, True)]),
        (Bucket("t", tot_lim), []),
    ]
    # prompt limit does not cap the completion; completion limit caps it to what it has left
    decision = decide(windows, Demand(5, 1000), T0 + 1)
    assert decision.admitted and decision.reserved == Usage(5, 15)
    # completion limit with nothing left refuses even a demand with no completion
    windows[1] = (Bucket("c", comp_lim), [Charge(T0, 40, True)])
    decision = decide(windows, Demand(5, 0), T0 + 1)
    assert not decision.admitted and decision.blocking.limit == comp_lim
    assert decision.retry_at == T0 + 60


# --------------------------------------------------------------------------------------------
# Debt


async def test_debt_stays_until_expiry_exclusive_boundary(store, clock):
    bs = buckets(total(100))
    _, res = await store.reserve(rid(), bs, Demand(10, 20))
    statuses = await store.settle(res, Usage(10, 190))
    assert (statuses[0].used, statuses[0].reserved, statuses[0].remaining) == (200, 0, 0)

    for when in (T0 + 1, T0 + 30, T0 + 59, T0 + 59.999):
        clock.at(when)
        (s,) = await store.status(bs)
        assert (s.used, s.remaining, s.reset_at) == (200, 0, T0 + 60), when
        decision, _ = await store.reserve(rid(), bs, Demand(1, 0))
        assert not decision.admitted and decision.retry_at == T0 + 60

    clock.at(T0 + 60)  # stamp + duration: the charge is out of (t - d, t]
    (s,) = await store.status(bs)
    assert (s.used, s.reserved, s.remaining) == (0, 0, 100)


async def test_debt_outlives_older_charges(store, clock):
    bs = buckets(total(100))
    await charge(store, bs, Demand(10, 20), Usage(10, 20))  # stamp T0: 30
    clock.at(T0 + 20)
    decision, res = await store.reserve(rid(), bs, Demand(10, 500))
    assert decision.reserved == Usage(10, 60)
    await store.settle(res, Usage(10, 290))  # stamp T0+20: 300, far over the 70 left
    (s,) = await store.status(bs)
    assert (s.used, s.remaining) == (330, 0)

    clock.at(T0 + 60)  # the first charge expires, the debt does not
    (s,) = await store.status(bs)
    assert (s.used, s.remaining, s.reset_at) == (300, 0, T0 + 80)
    decision, _ = await store.reserve(rid(), bs, Demand(1, 0))
    assert not decision.admitted and decision.retry_at == T0 + 80

    clock.at(T0 + 79.999)
    (s,) = await store.status(bs)
    assert s.used == 300
    clock.at(T0 + 80)
    (s,) = await store.status(bs)
    assert (s.used, s.remaining) == (0, 100)


def test_status_of_window_boundary_pure():
    lim = total(100, 60)
    charges = [Charge(10.0, 30, True), Charge(20.0, 40, False)]
    assert status_of(lim, charges, 10.0) == LimitStatus(lim, 30, 40, 80.0)
    assert status_of(lim, charges, 69.999) == LimitStatus(lim, 30, 40, 80.0)
    assert status_of(lim, charges, 70.0) == LimitStatus(lim, 0, 40, 80.0)
    assert status_of(lim, charges, 80.0) == LimitStatus(lim, 0, 0, 80.0)  # empty: reset is now
    assert status_of(lim, [Charge(0.0, 250, True)], 1.0).remaining == 0


# --------------------------------------------------------------------------------------------
# G3 exact books

ALL_DIMENSIONS = (
    limit("prompt_tokens", 1000, 60),
    limit("completion_tokens", 1000, 60),
    limit("total_tokens", 1000, 60),
    limit(REQUESTS, 10, 60),
)


async def test_g3_each_dimension_counts_its_own_figure(store, clock):
    bs = buckets(*ALL_DIMENSIONS)
    decision, res = await store.reserve(rid(), bs, Demand(30, 50))
    assert decision.reserved == Usage(30, 50)
    reserved = {s.limit.dimension: (s.used, s.reserved) for s in decision.statuses}
    assert reserved == {
        "prompt_tokens": (0, 30),
        "completion_tokens": (0, 50),
        "total_tokens": (0, 80),
        REQUESTS: (0, 1),
    }
    clock.advance(2)
    settled = await store.settle(res, Usage(25, 70))
    expected = {
        "prompt_tokens": (25, 0),
        "completion_tokens": (70, 0),
        "total_tokens": (95, 0),
        REQUESTS: (1, 0),
    }
    assert {s.limit.dimension: (s.used, s.reserved) for s in settled} == expected
    now = {s.limit.dimension: (s.used, s.reserved) for s in await store.status(bs)}
    assert now == expected


async def test_g3_settle_twice_charges_once(store):
    bs = buckets(*ALL_DIMENSIONS)
    _, res = await store.reserve(rid(), bs, Demand(30, 50))
    first = await store.settle(res, Usage(25, 70))
    second = await store.settle(res, Usage(500, 500))
    assert first == second == await store.status(bs)
    assert {s.limit.dimension: s.used for s in second}["total_tokens"] == 95


async def test_g3_release_removes_reservation_fully(store):
    bs = buckets(*ALL_DIMENSIONS)
    _, keep = await store.reserve(rid(), bs, Demand(5, 5))
    _, res = await store.reserve(rid(), bs, Demand(30, 50))
    statuses = await store.release(res)
    assert {s.limit.dimension: (s.used, s.reserved) for s in statuses} == {
        "prompt_tokens": (0, 5),
        "completion_tokens": (0, 5),
        "total_tokens": (0, 10),
        REQUESTS: (0, 1),
    }
    await store.release(keep)
    for s in await store.status(bs):
        assert (s.used, s.reserved, s.remaining) == (0, 0, s.limit.count)


async def test_g3_settle_after_release_changes_nothing(store):
    bs = buckets(*ALL_DIMENSIONS)
    _, res = await store.reserve(rid(), bs, Demand(30, 50))
    released = await store.release(res)
    assert await store.settle(res, Usage(25, 70)) == released
    for s in await store.status(bs):
        assert (s.used, s.reserved) == (0, 0)


async def test_g3_release_after_settle_changes_nothing(store):
    bs = buckets(*ALL_DIMENSIONS)
    _, res = await store.reserve(rid(), bs, Demand(30, 50))
    settled = await store.settle(res, Usage(25, 70))
    assert await store.release(res) == settled
    assert {s.limit.dimension: (s.used, s.reserved) for s in await store.status(bs)} == {
        "prompt_tokens": (25, 0),
        "completion_tokens": (70, 0),
        "total_tokens": (95, 0),
        REQUESTS: (1, 0),
    }


async def test_g3_zero_usage_settles_to_zero(store):
    bs = buckets(total(100))
    _, res = await store.reserve(rid(), bs, Demand(30, 50))
    (s,) = await store.settle(res, Usage(0, 0))
    assert (s.used, s.reserved, s.remaining) == (0, 0, 100)


# --------------------------------------------------------------------------------------------
# G4 truthful reset


async def test_g4_retry_at_admits_same_demand(store, clock):
    bs = buckets(total(100))
    await charge(store, bs, Demand(10, 10), Usage(50, 40))  # 90 at T0
    clock.at(T0 + 10)
    demand = Demand(20, 100)
    refused, _ = await store.reserve(rid(), bs, demand)
    assert not refused.admitted and refused.retry_at == T0 + 60
    assert seconds_until(refused.retry_at, clock.now) == 50

    clock.at(refused.retry_at - 0.001)
    still, _ = await store.reserve(rid(), bs, demand)
    assert not still.admitted and still.retry_at == refused.retry_at

    clock.at(refused.retry_at)
    admitted, _ = await store.reserve(rid(), bs, demand)
    assert admitted.admitted


async def test_g4_retry_at_is_when_enough_expired_not_all(store, clock):
    bs = buckets(total(100))
    await charge(store, bs, Demand(1, 1), Usage(20, 0))  # T0: 20
    clock.at(T0 + 10)
    await charge(store, bs, Demand(1, 1), Usage(30, 0))  # T0+10: 30
    clock.at(T0 + 20)
    await charge(store, bs, Demand(1, 1), Usage(40, 0))  # T0+20: 40
    clock.at(T0 + 30)  # 90 used, 10 left
    demand = Demand(55, 0)  # fits once 45 more are free: after T0 and T0+10 expire
    refused, _ = await store.reserve(rid(), bs, demand)
    assert not refused.admitted
    assert refused.retry_at == T0 + 70
    assert refused.blocking.reset_at == T0 + 80  # all gone only later
    clock.at(T0 + 69.999)
    assert not (await store.reserve(rid(), bs, demand))[0].admitted
    clock.at(T0 + 70)
    assert (await store.reserve(rid(), bs, demand))[0].admitted


async def test_g4_prompt_larger_than_count_never_fits(store):
    bs = buckets(total(100))
    decision, res = await store.reserve(rid(), bs, Demand(101, 0))
    assert not decision.admitted and res is None
    assert decision.retry_at is None
    assert decision.blocking.limit == total(100)


def test_fits_at_pure():
    lim = total(100, 60)
    charges = [Charge(30.0, 40, True), Charge(10.0, 50, False), Charge(20.0, 25, True)]
    now = 40.0  # 115 held, in debt
    assert fits_at(lim, charges, now, 101) is None
    assert fits_at(lim, charges, now, 35) == 70.0  # 10.0 expires: 65 held
    assert fits_at(lim, charges, now, 60) == 80.0  # 20.0 expires too: 40 held
    assert fits_at(lim, charges, now, 61) == 90.0  # all expired
    assert fits_at(lim, charges, now, 100) == 90.0
    assert fits_at(lim, [Charge(30.0, 10, True)], now, 90) == now
    assert fits_at(lim, [], now, 100) == now


# --------------------------------------------------------------------------------------------
# Several limits

PROMPT_50 = limit("prompt_tokens", 50, 60, "1m")
TOTAL_100 = limit("total_tokens", 100, 60, "1m")
TOTAL_1000 = limit("total_tokens", 1000, 3600, "1h")
SEVERAL = (PROMPT_50, TOTAL_100, TOTAL_1000)


async def test_several_every_limit_must_hold(store, clock):
    bs = buckets(*SEVERAL)
    decision, res = await store.reserve(rid(), bs, Demand(40, 500))
    assert decision.admitted and decision.reserved == Usage(40, 60)
    await store.settle(res, Usage(40, 10))  # prompt 40/50, total 50/100
    clock.advance(1)
    # total has 50 left, but the prompt limit only 10: it refuses
    decision, _ = await store.reserve(rid(), bs, Demand(20, 0))
    assert not decision.admitted
    assert decision.blocking.limit == PROMPT_50
    assert decision.retry_at == T0 + 60
    # a prompt that fits the prompt limit is admitted and capped by total
    decision, _ = await store.reserve(rid(), bs, Demand(10, 500))
    assert decision.admitted and decision.reserved == Usage(10, 40)


async def test_several_retry_at_is_latest_of_blocking(store, clock):
    bs = buckets(*SEVERAL)
    await charge(store, bs, Demand(45, 0), Usage(45, 0))  # T0: prompt 45, total 45
    clock.at(T0 + 30)
    await charge(store, bs, Demand(0, 50), Usage(0, 100))  # T0+30: total 100 (debt)
    clock.at(T0 + 31)
    statuses = await status_by_name(store, bs)
    assert (statuses[PROMPT_50.name].used, statuses[PROMPT_50.name].remaining) == (45, 5)
    assert (statuses[TOTAL_100.name].used, statuses[TOTAL_100.name].remaining) == (145, 0)
    assert statuses[TOTAL_1000.name].remaining == 855

    demand = Demand(10, 0)
    decision, _ = await store.reserve(rid(), bs, demand)
    assert not decision.admitted
    # prompt limit fits at T0+60, total-1m only at T0+90: the later one is reported
    assert decision.retry_at == T0 + 90
    assert decision.blocking.limit == TOTAL_100
    clock.at(T0 + 60)
    decision, _ = await store.reserve(rid(), bs, demand)
    assert not decision.admitted and decision.blocking.limit == TOTAL_100
    clock.at(T0 + 89.999)
    assert not (await store.reserve(rid(), bs, demand))[0].admitted
    clock.at(T0 + 90)
    assert (await store.reserve(rid(), bs, demand))[0].admitted


async def test_several_hour_limit_blocks_longest(store, clock):
    bs = buckets(*SEVERAL)
    for step in range(3):  # 400 per request, each in a fresh minute: the hour fills up
        clock.at(T0 + 100 * step)
        await charge(store, bs, Demand(10, 90), Usage(10, 390))
    clock.at(T0 + 300)
    statuses = await status_by_name(store, bs)
    assert statuses[TOTAL_1000.name].used == 1200
    assert statuses[TOTAL_100.name].used == 0
    decision, _ = await store.reserve(rid(), bs, Demand(10, 0))
    assert not decision.admitted
    assert decision.blocking.limit == TOTAL_1000
    assert decision.retry_at == T0 + 3600  # the first 400 expire: 800 held, 200 left
    assert most_restrictive(decision.statuses).limit == TOTAL_1000
    clock.at(T0 + 3600)
    assert (await store.reserve(rid(), bs, Demand(10, 0)))[0].admitted


async def test_several_never_wins_over_a_time(store, clock):
    bs = buckets(*SEVERAL)
    await charge(store, bs, Demand(10, 0), Usage(10, 95))
    decision, _ = await store.reserve(rid(), bs, Demand(60, 0))  # > prompt count 50
    assert not decision.admitted and decision.retry_at is None
    assert decision.blocking.limit == PROMPT_50


def test_most_restrictive_pure():
    a = LimitStatus(total(100), 60, 0, 200.0)  # 40 left
    b = LimitStatus(total(1000, 3600), 900, 50, 3000.0)  # 50 left
    c = LimitStatus(limit("prompt_tokens", 50, 60), 10, 0, 150.0)  # 40 left, earlier reset
    assert most_restrictive([a, b]) is a
    assert most_restrictive([b, c, a]) is a  # tie on 40: later reset wins
    assert most_restrictive([c, b]) is c
    assert most_restrictive([]) is None
    debt = LimitStatus(total(100), 300, 0, 100.0)
    zero = LimitStatus(total(10), 10, 0, 90.0)
    assert most_restrictive([zero, debt, a]) is debt  # both 0 left (debt clamps): later reset


def test_seconds_until_rounds_up():
    assert seconds_until(1060.0, 1000.0) == 60
    assert seconds_until(1060.2, 1000.0) == 61
    assert seconds_until(1000.001, 1000.0) == 1
    assert seconds_until(1000.0, 1000.0) == 0
    assert seconds_until(990.0, 1000.0) == 0


def test_slots_are_a_64th_of_the_window_counted_from_the_epoch():
    assert SLOTS == 64
    # A minute's slots are 0.9375 s wide: T0 = 1000.0 is in [999.375, 1000.3125).
    assert [slot_of(at, 60) for at in (999.375, T0, 1000.3124, 1000.3125)] == [1066] * 3 + [1067]
    assert slot_of(T0, 3600) == slot_of(T0 + 12.4, 3600) == 17  # [956.25, 1012.5)
    assert slot_of(T0 + 12.5, 3600) == 18


def test_a_merged_slot_keeps_the_newest_stamp_and_the_sum():
    slot = merged(None, T0, 5)
    assert slot == Charge(T0, 5, settled=True)  # a lone charge keeps its exact stamp
    slot = merged(slot, T0 + 0.25, 7)
    assert slot == Charge(T0 + 0.25, 12, settled=True)
    assert merged(slot, T0 + 0.125, 0) == Charge(T0 + 0.25, 12, settled=True)  # settled late


# --------------------------------------------------------------------------------------------
# Scopes


def proxy(scope: str, *limits: Limit, name: str = "p") -> SimpleNamespace:
    return SimpleNamespace(name=name, scope=scope, limits=limits)


async def test_scope_key_separate_budgets(store):
    px = proxy("key", total(100))
    alice, bob = buckets_for(px, "alice"), buckets_for(px, "bob")
    assert alice[0].key != bob[0].key
    await charge(store, alice, Demand(50, 50), Usage(50, 50))
    assert not (await store.reserve(rid(), alice, Demand(1, 0)))[0].admitted
    (s,) = await store.status(bob)
    assert (s.used, s.remaining) == (0, 100)
    decision, _ = await store.reserve(rid(), bob, Demand(10, 10))
    assert decision.admitted


async def test_scope_proxy_shared_budget(store):
    px = proxy("proxy", total(100), limit("prompt_tokens", 50, 60))
    alice, bob = buckets_for(px, "alice"), buckets_for(px, "bob")
    assert [b.key for b in alice] == [b.key for b in bob]
    await charge(store, alice, Demand(20, 50), Usage(20, 60))
    s_total, s_prompt = await store.status(bob)
    assert (s_total.used, s_prompt.used) == (80, 20)
    decision, _ = await store.reserve(rid(), bob, Demand(21, 0))
    assert not decision.admitted


async def test_scope_separate_proxies_do_not_share(store):
    one = buckets_for(proxy("proxy", total(100), name="one"), "alice")
    two = buckets_for(proxy("proxy", total(100), name="two"), "alice")
    await charge(store, one, Demand(10, 10), Usage(50, 50))
    assert (await store.status(two))[0].used == 0


# --------------------------------------------------------------------------------------------
# Concurrency in one store


async def test_concurrent_reservations_count_until_settled(store, clock):
    bs = buckets(total(1000))
    demand = Demand(100, 100)
    results = await asyncio.gather(*(store.reserve(rid(), bs, demand) for _ in range(4)))
    assert all(d.admitted and d.reserved == Usage(100, 100) for d, _ in results)
    (s,) = await store.status(bs)
    assert (s.used, s.reserved, s.remaining) == (0, 800, 200)

    fifth, res5 = await store.reserve(rid(), bs, Demand(100, 500))
    assert fifth.admitted and fifth.reserved == Usage(100, 100)
    assert res5 is not None and res5.amounts == Usage(100, 100)
    assert fifth.statuses[0].remaining == 0

    sixth, none = await store.reserve(rid(), bs, Demand(1, 0))
    assert not sixth.admitted and none is None
    assert sixth.retry_at == T0 + 60

    # A release gives its hold back straight away.
    await store.release(results[0][1])
    again, _ = await store.reserve(rid(), bs, Demand(1, 0))
    assert again.admitted


async def test_concurrent_gather_never_overbooks(store):
    bs = buckets(total(1000))
    results = await asyncio.gather(*(store.reserve(rid(), bs, Demand(40, 150)) for _ in range(8)))
    admitted = [d for d, _ in results if d.admitted]
    assert sum(d.reserved.prompt + d.reserved.completion for d in admitted) <= 1000
    (s,) = await store.status(bs)
    assert s.reserved == sum(d.reserved.prompt + d.reserved.completion for d in admitted)
    # 5 x 190 = 950, then 40 + 10: the sixth is admitted with the cap, the rest refused
    assert len(admitted) == 6 and admitted[-1].reserved == Usage(40, 10)
    assert s.remaining == 0


# --------------------------------------------------------------------------------------------
# What a stream's trailer and the queue read from a decision


async def test_held_back_only_when_in_flight_reservations_refuse(store, clock):
    bs = buckets(total(100), limit(REQUESTS, 3, 60))
    _, first = await store.reserve(rid(), bs, Demand(10, 80))  # 90 held, not spent
    decision, _ = await store.reserve(rid(), bs, Demand(20, 5))
    assert not decision.admitted and held_back_by_reservations(decision, Demand(20, 5))
    await store.settle(first, Usage(10, 75))  # now spent: waiting would not help
    decision, _ = await store.reserve(rid(), bs, Demand(20, 5))
    assert not decision.admitted and not held_back_by_reservations(decision, Demand(20, 5))
    clock.advance(60)
    decision, _ = await store.reserve(rid(), bs, Demand(101, 0))  # never fits: no wait
    assert decision.retry_at is None and not held_back_by_reservations(decision, Demand(101, 0))
    admitted, _ = await store.reserve(rid(), bs, Demand(5, 5))
    assert admitted.admitted and not held_back_by_reservations(admitted, Demand(5, 5))


def test_settled_view_swaps_this_reservation_for_its_usage():
    statuses = (
        LimitStatus(total(100), used=30, reserved=50, reset_at=T0),
        LimitStatus(limit("completion_tokens", 40, 60), used=5, reserved=35, reset_at=T0),
        LimitStatus(limit(REQUESTS, 3, 60), used=1, reserved=2, reset_at=T0),
    )
    after = settled_view(statuses, Usage(10, 30), Usage(10, 12))
    assert [(s.used, s.reserved, s.remaining) for s in after] == [
        (52, 10, 38),
        (17, 5, 18),
        (2, 1, 0),
    ]
    # Debt: more than was reserved drives the view to 0, never below.
    assert settled_view(statuses, Usage(10, 30), Usage(10, 500))[0].remaining == 0
    # The only reservation in flight settles: nothing stays reserved.
    alone = (LimitStatus(total(100), used=30, reserved=40, reset_at=T0),)
    assert [(s.used, s.reserved) for s in settled_view(alone, Usage(10, 30), Usage(5, 5))] == [
        (40, 0)
    ]


def test_a_window_with_one_left_admits_what_needs_one():
    """Requests and completion windows need one unit left; prompt and total, the prompt."""
    windows = [
        (Bucket("r", limit(REQUESTS, 3, 60)), [Charge(T0, 2, True)]),
        (Bucket("c", limit("completion_tokens", 40, 60)), [Charge(T0, 39, True)]),
        (Bucket("t", total(100)), []),
    ]
    decision = decide(windows, Demand(50, 30), T0 + 1)
    assert decision.admitted and decision.reserved == Usage(50, 1)


def test_every_decision_carries_the_windows_it_was_taken_on():
    windows = [(Bucket("t", total(100)), [Charge(T0, 60, True)])]
    expected = (LimitStatus(total(100), used=60, reserved=0, reset_at=T0 + 60),)
    for demand in (Demand(10, 10), Demand(50, 0), Demand(101, 0)):  # admitted, later, never
        assert decide(windows, demand, T0 + 1).statuses == expected, demand


def test_two_windows_refusing_until_the_same_moment_name_the_first():
    windows = [
        (Bucket("t", total(100)), [Charge(T0, 100, True)]),
        (Bucket("p", limit("prompt_tokens", 100, 60)), [Charge(T0, 100, True)]),
    ]
    decision = decide(windows, Demand(10, 0), T0 + 1)
    assert not decision.admitted and decision.retry_at == T0 + 60
    assert decision.blocking.limit == total(100)


# --------------------------------------------------------------------------------------------
# Stateful property test against an independent model

# Two callers and two models on one proxy: each caller's total (cached prompt tokens counting a
# tenth), completion and request limits, a total the team shares, and a budget of 600
# micro-dollars for o4 models only, at rates that are not whole micro-dollars per token (2.5 and
# 13.3), so the model's own rounding, done here in fractions, is checked against the limiter's.
M_TOTAL = replace(limit("total_tokens", 100, 60, "1m"), cached_weight=Fraction(1, 10))
M_COMPLETION = limit("completion_tokens", 40, 30, "30s")
M_REQUESTS = limit(REQUESTS, 2, 10, "10s")
M_TEAM = replace(limit("total_tokens", 150, 60, "1m"), scope="proxy")
M_BUDGET = replace(limit(BUDGET, 600, 45, "45s"), models=("o4-*",))
M_PROXY = SimpleNamespace(
    name="m", scope="key", limits=(M_TOTAL, M_COMPLETION, M_REQUESTS, M_TEAM, M_BUDGET)
)
M_CALLERS, M_MODELS = ("a", "b"), ("o4-mini", "gpt-4.1")
M_RATES = Rates(2_500_000, 13_300_000)
PROMPT_PRICE, COMPLETION_PRICE = Fraction(5, 2), Fraction(133, 10)  # micro-dollars per token


@dataclass
class ModelCharge:
    stamp: float
    amount: int
    settled: bool
    reserved: int  # what the reservation held, to tell debt apart
    leaves: float = 0.0  # leaves the window at `leaves` + duration: its stamp, or its slot's

    def __post_init__(self) -> None:
        self.leaves = self.stamp


def same_slot(lim: Limit, one: float, other: float) -> bool:
    """Whether two stamps fall in one of the window's SLOTS equal slots, counted from 0."""
    width = lim.seconds / SLOTS
    return int(one // width) == int(other // width)


def prompt_cost(demand: Demand) -> int:
    return math.ceil(demand.prompt * PROMPT_PRICE)


def need_of(lim: Limit, demand: Demand) -> int:
    """What must be left: the prompt, and the completion tokens that must fit beside it."""
    least = min(demand.least, demand.completion)
    if lim.dimension == "total_tokens":
        return max(1, demand.prompt + least)
    if lim.dimension == BUDGET:
        return max(1, prompt_cost(demand) + math.ceil(least * COMPLETION_PRICE))
    if lim.dimension == REQUESTS:
        return 1
    return max(1, least)


def amount_of(lim: Limit, usage: Usage) -> int:
    if lim.dimension == BUDGET:
        return usage.cost
    if lim.dimension == REQUESTS:
        return 1
    if lim.dimension == "total_tokens":
        cached = min(usage.cached_prompt, usage.prompt)
        weighted = usage.prompt - cached + math.ceil(cached * lim.cached_weight)
        return weighted + usage.completion
    return usage.completion


def cap_of(lim: Limit, left: int, demand: Demand) -> float:
    """The most completion tokens a window with `left` lets a request reserve."""
    if lim.dimension == "total_tokens":
        return left - demand.prompt
    if lim.dimension == "completion_tokens":
        return left
    if lim.dimension == BUDGET:
        return math.floor((left - prompt_cost(demand)) / COMPLETION_PRICE)
    return math.inf


def buckets_of(caller: str, model: str | None) -> tuple[Bucket, ...]:
    """The windows of a request, by hand: the limits its model matches, each in its scope."""
    return tuple(
        Bucket(f"m:{'*' if lim.scope == 'proxy' else caller}:{lim.name}", lim)
        for lim in M_PROXY.limits
        if model is None or not lim.models or model.startswith("o4-")
    )


class LimiterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock(T0)
        self.store = MemoryStore(clock=self.clock)
        self.model: dict[str, dict[str, ModelCharge]] = collections.defaultdict(dict)
        self.reservations: list[Reservation] = []
        self.next_id = 0

    def teardown(self) -> None:
        self.loop.close()

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    # -- the model ---------------------------------------------------------------------------

    def live(self, b: Bucket, at: float) -> list[ModelCharge]:
        return [c for c in self.model[b.key].values() if c.leaves + b.limit.seconds > at]

    def held(self, b: Bucket, at: float) -> int:
        return sum(c.amount for c in self.live(b, at))

    def fits(self, bs, demand: Demand, at: float) -> bool:
        return all(self.held(b, at) + need_of(b.limit, demand) <= b.limit.count for b in bs)

    def earliest_fit(self, bs, demand: Demand, now: float) -> float | None:
        if any(need_of(b.limit, demand) > b.limit.count for b in bs):
            return None
        moments = {now}
        for b in bs:
            moments |= {c.leaves + b.limit.seconds for c in self.live(b, now)}
        for at in sorted(moments):
            if self.fits(bs, demand, at):
                return at
        raise AssertionError("model: the demand never fits once everything expired")

    def windows_at(self, bs, at: float) -> list[tuple[Bucket, list[Charge]]]:
        return [(b, [Charge(c.leaves, c.amount, c.settled) for c in self.live(b, at)]) for b in bs]

    def check_statuses(self, bs, statuses, now: float) -> None:
        assert len(statuses) == len(bs)
        for b, s in zip(bs, statuses, strict=True):
            assert s.limit == b.limit
            live = self.live(b, now)
            assert s.used == sum(c.amount for c in live if c.settled)
            assert s.reserved == sum(c.amount for c in live if not c.settled)
            assert s.remaining >= 0
            assert s.remaining == max(0, b.limit.count - s.used - s.reserved)

    # -- rules -------------------------------------------------------------------------------

    @rule(
        prompt=st.integers(0, 110),
        completion=st.integers(0, 80),
        least=st.integers(0, 3),
        caller=st.sampled_from(M_CALLERS),
        model=st.sampled_from(M_MODELS),
    )
    def reserve(self, prompt: int, completion: int, least: int, caller: str, model: str) -> None:
        now = self.clock.now
        bs = buckets_for(M_PROXY, caller, model)
        assert bs == buckets_of(caller, model)
        demand = Demand(prompt, completion, M_RATES, least)
        left = {b.key: b.limit.count - self.held(b, now) for b in bs}
        expect_admit = self.fits(bs, demand, now)
        rid_ = f"m{self.next_id}"
        self.next_id += 1
        decision, reservation = self.run(self.store.reserve(rid_, bs, demand))
        assert decision.admitted == expect_admit
        event("admitted" if expect_admit else "refused")
        if expect_admit:
            assert reservation is not None and reservation.stamp == now
            caps = [cap_of(b.limit, left[b.key], demand) for b in bs]
            want = max(0, min(completion, *caps))
            cost = prompt_cost(demand) + math.ceil(want * COMPLETION_PRICE)
            assert decision.reserved == Usage(prompt, want, cost=cost)
            for b in bs:
                if b.limit.dimension == BUDGET:
                    assert cost <= left[b.key]  # money is never reserved past its budget
            assert reservation.amounts == decision.reserved
            for b in bs:
                amount = amount_of(b.limit, decision.reserved)
                self.model[b.key][rid_] = ModelCharge(now, amount, False, amount)
                # An admission by itself never takes a window past its count.
                assert self.held(b, now) <= b.limit.count
            self.check_statuses(bs, decision.statuses, now)
            self.reservations.append(reservation)
            return

        assert reservation is None
        refusing = [b for b in bs if self.held(b, now) + need_of(b.limit, demand) > b.limit.count]
        # The queue waits only when settling every in-flight reservation at 0 would admit.
        spent = {b.key: sum(c.amount for c in self.live(b, now) if c.settled) for b in bs}
        would_fit = all(spent[b.key] + need_of(b.limit, demand) <= b.limit.count for b in refusing)
        can_ever_fit = self.earliest_fit(bs, demand, now) is not None
        assert held_back_by_reservations(decision, demand) == (would_fit and can_ever_fit)
        assert decision.blocking is not None
        assert decision.blocking.limit in [b.limit for b in refusing]
        expected_retry = self.earliest_fit(bs, demand, now)
        assert decision.retry_at == expected_retry
        if expected_retry is None:
            event("refused: never fits")
            return
        event(f"refused by {decision.blocking.limit.name}: G4 retry_at checked")
        assert decision.retry_at > now
        index = [b.limit for b in bs].index(decision.blocking.limit)
        blocking_charges = self.windows_at(bs, now)[index][1]
        blocking_need = need_of(decision.blocking.limit, demand)
        blocking_fit = fits_at(decision.blocking.limit, blocking_charges, now, blocking_need)
        assert blocking_fit == decision.retry_at
        # G4 on the pure rules: the modelled windows at retry_at admit the same demand ...
        windows = self.windows_at(bs, decision.retry_at)
        assert decide(windows, demand, decision.retry_at).admitted
        # ... and on a copy of the store: admitted at retry_at, refused just before.
        for at, admitted in ((decision.retry_at, True), (decision.retry_at - 0.001, False)):
            twin = copy.deepcopy(self.store)
            twin.clock.at(at)
            probe, _ = self.run(twin.reserve("probe", bs, demand))
            assert probe.admitted == admitted, (at, admitted)

    def pick(self, index: int) -> Reservation:
        """One of the admitted reservations (settled, released or not), or one never admitted."""
        if index == 0 or not self.reservations:
            bs = buckets_for(M_PROXY, "a", "o4-mini")
            return Reservation("ghost", self.clock.now, bs, Usage(50, 50))
        return self.reservations[index % len(self.reservations)]

    @rule(
        index=st.integers(0, 1_000),
        prompt=st.integers(0, 120),
        completion=st.integers(0, 90),
        cached=st.integers(0, 120),
        cost=st.integers(0, 1500),
    )
    def settle(self, index: int, prompt: int, completion: int, cached: int, cost: int) -> None:
        reservation = self.pick(index)
        now = self.clock.now
        usage = Usage(prompt, completion, cached_prompt=min(cached, prompt), cost=cost)
        for b in reservation.buckets:
            held = self.model[b.key].get(reservation.id)
            if held is not None and held.stamp + b.limit.seconds > now and not held.settled:
                held.amount = amount_of(b.limit, usage)
                held.settled = True
                if held.amount > held.reserved:
                    event("settle: debt")
                # Settled charges of one slot leave the window together, with the newest.
                slot = [
                    c
                    for c in self.live(b, now)
                    if c.settled and same_slot(b.limit, c.stamp, held.stamp)
                ]
                if len(slot) > 1:
                    event("settle: merged into a slot")
                for charge in slot:
                    charge.leaves = max(c.leaves for c in slot)
        statuses = self.run(self.store.settle(reservation, usage))
        self.check_statuses(reservation.buckets, statuses, now)

    @rule(index=st.integers(0, 1_000))
    def release(self, index: int) -> None:
        reservation = self.pick(index)
        now = self.clock.now
        for b in reservation.buckets:
            held = self.model[b.key].get(reservation.id)
            if held is not None and held.stamp + b.limit.seconds > now and not held.settled:
                del self.model[b.key][reservation.id]
        statuses = self.run(self.store.release(reservation))
        self.check_statuses(reservation.buckets, statuses, now)

    @rule(halves=st.integers(1, 140))
    def advance(self, halves: int) -> None:
        self.clock.advance(halves * 0.5)

    @rule(eighths=st.integers(1, 8))
    def tick(self, eighths: int) -> None:
        """Steps shorter than a slot, so that charges share slots and straddle their edges."""
        self.clock.advance(eighths * 0.125)

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def books_match_model(self) -> None:
        now = self.clock.now
        for caller in M_CALLERS:
            bs = buckets_for(M_PROXY, caller)  # every limit, the team's included
            self.check_statuses(bs, self.run(self.store.status(bs)), now)

    @invariant()
    def over_count_only_through_debt(self) -> None:
        now = self.clock.now
        for caller in M_CALLERS:
            for b in buckets_for(M_PROXY, caller):
                live = self.live(b, now)
                if self.held(b, now) > b.limit.count:
                    assert any(c.settled and c.amount > c.reserved for c in live)
                # By no more than the debt itself: what settled above its reservation.
                debt = sum(max(0, c.amount - c.reserved) for c in live if c.settled)
                assert self.held(b, now) <= b.limit.count + debt


LimiterMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_limiter_state_machine = LimiterMachine.TestCase


@pytest.mark.parametrize(
    ("value", "minimum", "expected"),
    [
        (0, 0, True),
        (7, 1, True),
        (1, 1, True),
        (0, 1, False),
        (-1, 0, False),
        (True, 0, False),  # JSON's true is not a count, though Python's bool is an int
        (False, 0, False),
        (1.0, 0, False),
        ("3", 0, False),
        (None, 0, False),
    ],
)
def test_whole_number_is_a_json_count(value, minimum, expected):
    assert whole_number(value, minimum) is expected


def test_whole_number_counts_from_zero_by_default():
    assert whole_number(0) and not whole_number(-1)


def test_a_strict_request_of_n_completions_is_admitted_only_with_a_token_for_each():
    """Each of the n completions gets max tokens >= 1: the reserve must hold n tokens, or the
    provider could bill n - reserve tokens past the limit."""
    windows = [
        (Bucket("k:t", total(100)), [Charge(T0, 87, True)]),
        (Bucket("k:c", limit("completion_tokens", 50, 60)), [Charge(T0, 47, True)]),
    ]
    three = Demand(10, 300, least=3)
    assert decide(windows, three, T0 + 1).reserved == Usage(10, 3)  # 13 left, 3 completion
    assert not decide(windows, replace(three, prompt=11), T0 + 1).admitted
    windows[1] = (windows[1][0], [Charge(T0, 48, True)])  # 2 completion tokens left: too few
    refused = decide(windows, three, T0 + 1)
    assert not refused.admitted and refused.blocking.limit.dimension == "completion_tokens"
    assert decide(windows, replace(three, least=0), T0 + 1).admitted  # without strict
