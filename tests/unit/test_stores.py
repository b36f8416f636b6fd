"""One conformance suite for every store (G5): the same trace gives the same answers.

Each scenario drives a store through a `Recorder`, which logs every decision, reservation,
status and the headers (and 429) a caller would get, and checks figures worked out by hand.
Every scenario runs against memory, SQLite (a file under tmp_path), Redis (a real
redis-server) and Redis Cluster (the session's local cluster of three masters), and each log
must equal the memory store's log for the same trace. A hypothesis test does the same with random
traces. Store-specific tests follow: Redis (server clock, TTLs, hash slots, passwords, outages,
cluster seeds) and SQLite (restarts, WAL, two stores on one file, failures).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
import uuid
import zipfile
from collections.abc import Awaitable, Callable
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis as redis_sync
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from tokengate_core import answers
from tokengate_core.config import REQUESTS
from tokengate_core.dialects.openai import OpenAI
from tokengate_core.limiter import BUDGET, SLOTS, Bucket, Decision, Demand, Rates, Usage
from tokengate_core.quota import buckets_for
from tokengate_core.stores import STALE_AFTER, Reservation, Store, StoreUnavailable
from tokengate_core.stores.memory import MemoryStore
from tokengate_core.stores.redis import RESERVE, SETTLE, RedisStore, redacted
from tokengate_core.stores.sqlite import SqliteStore

from scripts.bench.redis_server import free_port
from tests.support.limits import T0, FakeClock, buckets, limit, total
from tests.support.processes import self_signed
from tests.support.redis_server import RedisServer, require_redis_server

KINDS = ("memory", "sqlite", "redis", "redis-cluster")
# The long runs (random traces, 10,000 requests) run the cluster's scripts on one node: the
# cluster runs the same scripts, and what it adds (routing each call to its slot's master) the
# scenarios exercise.
LONG_RUN_KINDS = KINDS[:3]
REDIS_FIXTURES = {"redis": "redis_server", "redis-cluster": "redis_cluster_session"}
Opener = Callable[..., Store]

PROMPT_50 = limit("prompt_tokens", 50, 60, "1m")
TOTAL_100 = limit("total_tokens", 100, 60, "1m")
TOTAL_1000_1H = limit("total_tokens", 1000, 3600, "1h")
ALL_DIMENSIONS = (
    limit("prompt_tokens", 1000, 60, "1m"),
    limit("completion_tokens", 1000, 60, "1m"),
    limit("total_tokens", 1000, 60, "1m"),
    limit(REQUESTS, 10, 60, "1m"),
    limit(BUDGET, 1_000_000, 60, "1m"),
)


def opener(kind: str, folder: Path, redis_url: str | None) -> Opener:
    """A function making fresh, empty stores of `kind` (each Redis store gets its own prefix)."""
    files = itertools.count()

    def open_store(clock, stale_after: float = STALE_AFTER) -> Store:
        if kind == "memory":
            return MemoryStore(clock, stale_after)
        if kind == "sqlite":
            return SqliteStore(folder / f"usage-{next(files)}.sqlite", clock, stale_after)
        prefix = f"t-{uuid.uuid4().hex[:12]}"
        return RedisStore(redis_url, clock, stale_after, prefix, cluster=kind == "redis-cluster")

    return open_store


def redis_url(kind: str, request) -> str | None:
    """The URL of the session's Redis server or cluster for `kind`; None for other stores."""
    fixture = REDIS_FIXTURES.get(kind)
    return request.getfixturevalue(fixture).url if fixture else None


def redis_client(url: str, cluster: bool) -> redis_sync.Redis | redis_sync.RedisCluster:
    """A synchronous client, to look at what a store wrote."""
    client_class = redis_sync.RedisCluster if cluster else redis_sync.Redis
    return client_class.from_url(url, decode_responses=True)


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
async def open_store(kind, tmp_path, request):
    """Stores of the parametrized kind, closed after the test."""
    make = opener(kind, tmp_path, redis_url(kind, request))
    opened: list[Store] = []

    def open_and_track(clock, stale_after: float = STALE_AFTER) -> Store:
        opened.append(store := make(clock, stale_after))
        return store

    yield open_and_track
    for store in opened:
        await store.close()


# A limit of some models only, a team window shared by every key, two requests a minute, a
# budget of one cent an hour, and a price (2.50 and 10.00 USD per 1M tokens) to count it by.
O4_100 = replace(limit("total_tokens", 100, 60, "1m"), models=("o4-*",))
TEAM_150 = replace(limit("total_tokens", 150, 60, "1m"), scope="proxy")
REQUESTS_2 = limit(REQUESTS, 2, 60, "1m")
CENT_1H = limit(BUDGET, 10_000, 3600, "1h")
RATES = Rates(2_500_000, 10_000_000)


class Recorder:
    """Drives one store with a fake clock and logs every answer a caller could see."""

    def __init__(self, store: Store, clock: FakeClock) -> None:
        self.store = store
        self.clock = clock
        self.log: list = []
        self.held: dict[str, Reservation] = {}

    async def reserve(
        self, name: str, bs: tuple[Bucket, ...], demand: Demand
    ) -> tuple[Decision, Reservation | None]:
        decision, reservation = await self.store.reserve(name, bs, demand)
        now = self.clock.now
        if reservation is None:
            proxy = SimpleNamespace(name="p", scope="key")
            answer = answers.rate_limited(OpenAI(), decision, now, proxy, demand)
            seen = (dict(answer.headers), answer.content)
        else:
            self.held[name] = reservation
            seen = answers.ratelimit_headers(decision.statuses, now)
        self.log.append(("reserve", name, now, decision, reservation, seen))
        return decision, reservation

    async def finish(self, name: str, usage: Usage | None):
        """Settle `name` with `usage`, or release it when `usage` is None."""
        reservation = self.held[name]
        if usage is None:
            statuses = await self.store.release(reservation)
        else:
            statuses = await self.store.settle(reservation, usage)
        now = self.clock.now
        self.log.append(("finish", name, now, usage, statuses, self.headers(statuses)))
        return statuses

    async def status(self, bs: tuple[Bucket, ...]):
        statuses = await self.store.status(bs)
        self.log.append(("status", self.clock.now, statuses, self.headers(statuses)))
        return statuses

    def headers(self, statuses) -> dict[str, str]:
        return answers.ratelimit_headers(statuses, self.clock.now)


Scenario = Callable[[Recorder, FakeClock], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(function: Scenario) -> Scenario:
    SCENARIOS[function.__name__] = function
    return function


@scenario
async def admits_caps_and_refuses(r: Recorder, clock: FakeClock) -> None:
    bs = buckets(total(100))
    decision, _ = await r.reserve("a", bs, Demand(10, 256))
    assert decision.admitted and decision.reserved == Usage(10, 90)  # capped by what is left
    decision, _ = await r.reserve("b", bs, Demand(1, 0))
    assert not decision.admitted and decision.retry_at == T0 + 60
    clock.advance(1)
    (s,) = await r.finish("a", Usage(10, 20))
    assert (s.used, s.reserved, s.remaining) == (30, 0, 70)
    decision, _ = await r.reserve("c", bs, Demand(70, 256))
    assert decision.admitted and decision.reserved == Usage(70, 0)
    await r.finish("c", None)
    decision, _ = await r.reserve("d", bs, Demand(71, 0))
    assert not decision.admitted and decision.retry_at == T0 + 60


@scenario
async def debt_stays_until_its_window_ends(r: Recorder, clock: FakeClock) -> None:
    bs = buckets(total(100))
    await r.reserve("a", bs, Demand(10, 20))
    (s,) = await r.finish("a", Usage(10, 190))
    assert (s.used, s.remaining) == (200, 0)
    for when in (T0 + 30, T0 + 59.999):
        clock.at(when)
        decision, _ = await r.reserve(f"x{when}", bs, Demand(1, 0))
        assert not decision.admitted and decision.retry_at == T0 + 60
    clock.at(T0 + 60)
    (s,) = await r.status(bs)
    assert (s.used, s.reserved, s.remaining) == (0, 0, 100)


@scenario
async def several_limits_retry_at_the_latest(r: Recorder, clock: FakeClock) -> None:
    bs = buckets(PROMPT_50, TOTAL_100, TOTAL_1000_1H)
    await r.reserve("a", bs, Demand(45, 0))
    await r.finish("a", Usage(45, 0))
    clock.at(T0 + 30)
    await r.reserve("b", bs, Demand(0, 50))
    await r.finish("b", Usage(0, 100))  # debt on total-1m
    clock.at(T0 + 31)
    decision, _ = await r.reserve("c", bs, Demand(10, 0))
    assert not decision.admitted and decision.retry_at == T0 + 90
    assert decision.blocking.limit == TOTAL_100
    clock.at(T0 + 89.999)
    assert not (await r.reserve("d", bs, Demand(10, 0)))[0].admitted
    clock.at(T0 + 90)
    decision, _ = await r.reserve("e", bs, Demand(10, 500))
    assert decision.admitted and decision.reserved == Usage(10, 90)  # total-1m whole again
    decision, _ = await r.reserve("f", bs, Demand(60, 0))  # above the prompt count: never
    assert not decision.admitted and decision.retry_at is None
    assert decision.blocking.limit == PROMPT_50


@scenario
async def every_dimension_settles_once(r: Recorder, clock: FakeClock) -> None:
    bs = buckets(*ALL_DIMENSIONS)
    await r.reserve("keep", bs, Demand(5, 5, RATES))  # $: 12.5, rounded up, + 50
    decision, _ = await r.reserve("a", bs, Demand(30, 50, RATES))  # $: 75 + 500
    assert {s.limit.dimension: s.reserved for s in decision.statuses} == {
        "prompt_tokens": 35,
        "completion_tokens": 55,
        "total_tokens": 90,
        REQUESTS: 2,
        BUDGET: 63 + 575,
    }
    clock.advance(2)
    first = await r.finish("a", Usage(25, 70, cost=713))
    # a second settle changes nothing
    assert await r.finish("a", Usage(500, 500, cost=9_999)) == first
    assert await r.finish("a", None) == first  # nor does a release after it
    assert {s.limit.dimension: (s.used, s.reserved) for s in first} == {
        "prompt_tokens": (25, 5),
        "completion_tokens": (70, 5),
        "total_tokens": (95, 10),
        REQUESTS: (1, 1),
        BUDGET: (713, 63),
    }
    released = await r.finish("keep", None)
    assert await r.finish("keep", Usage(9, 9, cost=99)) == released  # settle after release
    assert [s.reserved for s in released] == [0, 0, 0, 0, 0]
    await r.reserve("zero", bs, Demand(3, 3, RATES))
    await r.finish("zero", Usage(0, 0))
    clock.advance(1)
    await r.status(bs)


@scenario
async def scopes_keep_their_own_books(r: Recorder, clock: FakeClock) -> None:
    by_key = SimpleNamespace(name="one", scope="key", limits=(TOTAL_100,))
    shared = SimpleNamespace(name="two", scope="proxy", limits=(TOTAL_100, PROMPT_50))
    await r.reserve("a", buckets_for(by_key, "alice"), Demand(50, 50))
    assert not (await r.reserve("b", buckets_for(by_key, "alice"), Demand(1, 0)))[0].admitted
    assert (await r.reserve("c", buckets_for(by_key, "bob"), Demand(10, 10)))[0].admitted
    await r.reserve("d", buckets_for(shared, "alice"), Demand(20, 50))
    await r.finish("d", Usage(20, 60))
    total_, prompt = await r.status(buckets_for(shared, "bob"))
    assert (total_.used, prompt.used) == (80, 20)
    assert not (await r.reserve("e", buckets_for(shared, "bob"), Demand(21, 0)))[0].admitted


@scenario
async def limits_of_a_model_count_that_model_only(r: Recorder, clock: FakeClock) -> None:
    proxy = SimpleNamespace(name="p", scope="key", limits=(limit("total_tokens", 1000, 60), O4_100))
    o4, gpt = buckets_for(proxy, "alice", "o4-mini"), buckets_for(proxy, "alice", "gpt-4.1")
    assert (len(o4), len(gpt)) == (2, 1)
    decision, _ = await r.reserve("a", o4, Demand(60, 500))
    assert decision.admitted and decision.reserved == Usage(60, 40)  # capped by o4's 100
    await r.finish("a", Usage(60, 40))
    decision, _ = await r.reserve("b", o4, Demand(5, 0))
    assert not decision.admitted and decision.blocking.limit == O4_100
    decision, _ = await r.reserve("c", gpt, Demand(5, 100))  # the same key, another model
    assert decision.admitted and decision.reserved == Usage(5, 100)
    await r.finish("c", Usage(5, 95))
    await r.status(buckets_for(proxy, "alice"))


@scenario
async def a_team_window_is_shared_by_its_keys(r: Recorder, clock: FakeClock) -> None:
    proxy = SimpleNamespace(name="p", scope="key", limits=(total(100), TEAM_150, REQUESTS_2))
    alice, bob = buckets_for(proxy, "alice"), buckets_for(proxy, "bob")
    decision, _ = await r.reserve("a", alice, Demand(10, 500))
    assert decision.reserved == Usage(10, 90)  # alice's own 100 caps it
    await r.finish("a", Usage(10, 80))
    decision, _ = await r.reserve("b", bob, Demand(10, 500))
    assert decision.reserved == Usage(10, 50)  # the team's 150 (90 spent by alice) caps bob
    await r.finish("b", Usage(10, 50))
    decision, _ = await r.reserve("c", bob, Demand(1, 0))
    assert not decision.admitted and decision.blocking.limit == TEAM_150
    clock.advance(60)
    for name in ("d", "e"):
        await r.reserve(name, bob, Demand(1, 1))
    decision, _ = await r.reserve("f", bob, Demand(1, 1))  # two requests a minute, per key
    assert not decision.admitted and decision.blocking.limit == REQUESTS_2
    assert (await r.reserve("g", alice, Demand(1, 1)))[0].admitted


@scenario
async def a_budget_caps_the_reserve_to_the_micro_dollar(r: Recorder, clock: FakeClock) -> None:
    bs = buckets(CENT_1H, REQUESTS_2)
    decision, _ = await r.reserve("a", bs, Demand(100, 2000, Rates(2_500_000, 13_300_000)))
    # 100 prompt tokens cost 250 micro-dollars; at 13.3 a token, 733 completion tokens fit in
    # the 9750 left (9748.9, rounded up: 9749), 734 would not.
    assert decision.reserved == Usage(100, 733, cost=9_999)
    await r.finish("a", Usage(100, 300, cached_prompt=40, cost=3_190))
    clock.advance(1)
    cheap = Rates(150_000, 600_000)  # 7 prompt tokens: 1.05, rounded up to 2
    decision, _ = await r.reserve("b", bs, Demand(7, 2000, cheap))
    assert decision.reserved == Usage(7, 2000, cost=2 + 1_200)
    await r.finish("b", Usage(7, 2000, cost=1_202))  # 5608 left
    clock.advance(61)
    decision, _ = await r.reserve("c", bs, Demand(2244, 0, RATES))  # 5610: two too many
    assert not decision.admitted and decision.blocking.limit == CENT_1H
    # when the first calls leave the window: they share a slot, which leaves with its newest
    assert decision.retry_at == T0 + 1 + 3600
    strict = Demand(2243, 10, RATES, least=1)  # 5608 for the prompt, none for a reply
    assert not (await r.reserve("d", bs, strict))[0].admitted
    decision, _ = await r.reserve("e", bs, replace(strict, least=0))
    assert decision.admitted and decision.reserved == Usage(2243, 0, cost=5_608)
    await r.finish("e", Usage(2243, 50, cost=6_108))  # the debt of a call without a bound
    (budget, _) = await r.status(bs)
    assert (budget.used, budget.remaining) == (3_190 + 1_202 + 6_108, 0)


@scenario
async def windows_expire_one_charge_at_a_time(r: Recorder, clock: FakeClock) -> None:
    bs = buckets(total(100))
    for step, used in enumerate((20, 30, 40)):
        clock.at(T0 + 10 * step)
        await r.reserve(f"s{step}", bs, Demand(1, 1))
        await r.finish(f"s{step}", Usage(used, 0))
    clock.at(T0 + 30)
    decision, _ = await r.reserve("big", bs, Demand(55, 0))  # fits once 45 more are free
    assert not decision.admitted and decision.retry_at == T0 + 70
    assert decision.blocking.reset_at == T0 + 80
    for when, used in ((T0 + 60, 70), (T0 + 70, 40), (T0 + 80, 0)):
        clock.at(when)
        (s,) = await r.status(bs)
        assert s.used == used, when
    clock.at(T0 + 200)
    decision, _ = await r.reserve("wait", bs, Demand(20, 200))  # a 429 past the SDK's wait
    await r.finish("wait", Usage(20, 180))
    clock.advance(1)
    assert not (await r.reserve("late", bs, Demand(1, 0)))[0].admitted


@scenario
async def waiting_until_retry_at_is_enough(r: Recorder, clock: FakeClock) -> None:
    bs = buckets(limit(REQUESTS, 2, 30, "30s"), total(1000, 3600))
    await r.reserve("a", bs, Demand(400, 0))
    clock.advance(5)
    await r.reserve("b", bs, Demand(400, 0))
    decision, _ = await r.reserve("c", bs, Demand(100, 0))
    assert not decision.admitted and decision.retry_at == T0 + 30  # requests-30s refuses
    clock.at(decision.retry_at - 0.001)
    assert not (await r.reserve("d", bs, Demand(100, 0)))[0].admitted
    clock.at(decision.retry_at)
    decision, _ = await r.reserve("e", bs, Demand(100, 500))
    assert decision.admitted and decision.reserved == Usage(100, 100)


@scenario
async def stale_reservations_count_as_settled(r: Recorder, clock: FakeClock) -> None:
    bs = buckets(TOTAL_1000_1H)
    await r.reserve("old", bs, Demand(100, 100))
    clock.advance(10)
    await r.reserve("young", bs, Demand(50, 50))
    clock.at(T0 + STALE_AFTER - 0.001)
    (s,) = await r.status(bs)
    assert (s.used, s.reserved) == (0, 300)
    clock.at(T0 + STALE_AFTER)  # "old" is stale: charged what it reserved
    (s,) = await r.status(bs)
    assert (s.used, s.reserved) == (200, 100)
    (s,) = await r.finish("old", Usage(1, 1))  # too late: changes nothing
    assert (s.used, s.reserved) == (200, 100)
    (s,) = await r.finish("young", Usage(10, 10))
    assert (s.used, s.reserved) == (220, 0)
    clock.at(T0 + 3600)  # settled, "old" joined the slot of "young" (one 56.25 s slot of 1h)
    (s,) = await r.status(bs)
    assert (s.used, s.reserved, s.reset_at) == (220, 0, T0 + 3610)
    clock.at(T0 + 3610)  # ... and leaves with it, 10 s late, never early
    (s,) = await r.status(bs)
    assert (s.used, s.reserved, s.reset_at) == (0, 0, T0 + 3610)


@scenario
async def release_of_the_newest_moves_the_reset_back(r: Recorder, clock: FakeClock) -> None:
    bs = buckets(total(100))
    await r.reserve("a", bs, Demand(10, 10))
    clock.advance(10)
    decision, _ = await r.reserve("b", bs, Demand(10, 10))
    assert decision.statuses[0].reset_at == T0 + 70
    (s,) = await r.finish("b", None)
    assert s.reset_at == T0 + 60
    (s,) = await r.finish("a", None)
    assert (s.used, s.reserved, s.reset_at) == (0, 0, clock.now)


@scenario
async def a_release_in_a_call_that_also_prunes(r: Recorder, clock: FakeClock) -> None:
    """The call that releases the newest reservation is also the one that finds an older
    charge gone: the window is read whole for both, and ends empty."""
    bs = buckets(total(100))
    await r.reserve("a", bs, Demand(10, 0))
    await r.finish("a", Usage(10, 0))
    clock.at(T0 + 10)
    await r.reserve("b", bs, Demand(10, 10))
    clock.at(T0 + 30)
    await r.reserve("c", bs, Demand(10, 10))
    clock.at(T0 + 60)  # "a" leaves the window now
    (s,) = await r.finish("c", None)
    assert (s.used, s.reserved, s.reset_at) == (0, 20, T0 + 70)
    (s,) = await r.finish("b", None)
    assert (s.used, s.reserved, s.reset_at) == (0, 0, T0 + 60)


@scenario
async def a_clock_going_back_never_stamps_earlier(r: Recorder, clock: FakeClock) -> None:
    bs = buckets(total(100))
    clock.at(T0 + 10)
    await r.reserve("a", bs, Demand(10, 10))
    clock.at(T0)  # e.g. an NTP step
    _, reservation = await r.reserve("b", bs, Demand(10, 10))
    assert reservation.stamp == T0 + 10


@scenario
async def a_changed_duration_reads_the_same_window_anew(r: Recorder, clock: FakeClock) -> None:
    """A reload that changes a limit's duration keeps its window (same bucket key): the charges
    already there count for the new duration, whichever way it moved."""
    key = "p:k:total_tokens#0"
    minute = (Bucket(key, limit("total_tokens", 1000, 60, "1m")),)
    hour = (Bucket(key, TOTAL_1000_1H),)
    await r.reserve("a", minute, Demand(50, 40))
    await r.finish("a", Usage(50, 40))
    clock.at(T0 + 120)
    (s,) = await r.status(hour)  # lengthened: two minutes old, still in an hour's window
    assert s.used == 90
    await r.reserve("b", hour, Demand(5, 5))
    await r.finish("b", Usage(5, 5))
    clock.at(T0 + 150)
    (s,) = await r.status(minute)  # shortened again: only the charge of 30 s ago is left
    assert s.used == 10
    clock.at(T0 + 200)
    (s,) = await r.status(hour)  # "a", dropped by the shorter window, stays dropped
    assert s.used == 10


# Slots (limiter.SLOTS = 64): a 1m window has slots of 0.9375 s, from the epoch. T0 = 1000.0 is
# in the slot [999.375, 1000.3125); the next starts at SLOT_EDGE.
SLOT_EDGE = T0 + 0.3125


@scenario
async def charges_of_one_slot_leave_with_the_newest(r: Recorder, clock: FakeClock) -> None:
    bs = buckets(total(100))
    for index, at in enumerate((T0, T0 + 0.125, T0 + 0.25)):
        clock.at(at)
        await r.reserve(f"s{index}", bs, Demand(10, 0))
    for index in (2, 0, 1):  # settled out of order: the slot keeps the newest stamp
        (s,) = await r.finish(f"s{index}", Usage(10, 20))
    assert (s.used, s.reset_at) == (90, T0 + 60.25)
    clock.at(T0 + 60)  # "s0" alone would have left now: merged, it stays (never early)
    decision, _ = await r.reserve("big", bs, Demand(20, 0))
    assert not decision.admitted and decision.retry_at == T0 + 60.25  # when the slot leaves
    clock.at(decision.retry_at)  # G4: waiting until then is enough
    decision, _ = await r.reserve("after", bs, Demand(20, 0))
    assert decision.admitted and decision.statuses[0].used == 0


@scenario
async def charges_straddling_a_slot_edge_leave_slot_by_slot(r: Recorder, clock: FakeClock) -> None:
    bs = buckets(total(100))
    for index, at in enumerate((T0, T0 + 0.25, SLOT_EDGE, T0 + 0.5)):
        clock.at(at)
        await r.reserve(f"s{index}", bs, Demand(5, 0))
        await r.finish(f"s{index}", Usage(5, 5 * index))
    # Slot [999.375, SLOT_EDGE) holds 5 + 10 (newest T0 + 0.25), the next 15 + 20 (T0 + 0.5).
    for at, used in ((T0 + 60.125, 50), (T0 + 60.25, 35), (SLOT_EDGE + 60, 35), (T0 + 60.5, 0)):
        clock.at(at)
        (s,) = await r.status(bs)
        assert s.used == used, at


@scenario
async def a_changed_duration_keeps_the_old_slots_apart(r: Recorder, clock: FakeClock) -> None:
    """Slots merged under one duration keep their width after an edit and leave the window by
    their newest stamp and the new duration; new charges merge into slots of the new width."""
    key = "p:k:total_tokens#0"
    minute = (Bucket(key, limit("total_tokens", 1000, 60, "1m")),)
    hour = (Bucket(key, TOTAL_1000_1H),)
    for name, at, used in (("a", T0, 30), ("b", T0 + 10, 20)):  # one 56.25 s slot of 1h
        clock.at(at)
        await r.reserve(name, hour, Demand(1, 0))
        await r.finish(name, Usage(used, 0))
    clock.at(T0 + 65)
    (s,) = await r.status(minute)  # "a" is 65 s old, but its slot's newest stamp is 55 s old
    assert (s.used, s.reset_at) == (50, T0 + 70)
    await r.reserve("c", minute, Demand(1, 0))
    await r.finish("c", Usage(5, 0))
    clock.at(T0 + 70)
    (s,) = await r.status(minute)
    assert (s.used, s.reset_at) == (5, T0 + 125)
    clock.at(T0 + 100)
    (s,) = await r.status(hour)  # lengthened again: what the minute dropped stays dropped
    assert (s.used, s.reset_at) == (5, T0 + 65 + 3600)


@pytest.mark.parametrize("name", SCENARIOS)
async def test_same_trace_same_answers(name, kind, open_store):
    clock, reference_clock = FakeClock(), FakeClock()
    recorder = Recorder(open_store(clock), clock)
    await SCENARIOS[name](recorder, clock)
    reference = Recorder(MemoryStore(reference_clock), reference_clock)
    await SCENARIOS[name](reference, reference_clock)
    assert recorder.log == reference.log


# --------------------------------------------------------------------------------------------
# Random traces (hypothesis): every store against the memory store, step by step

RANDOM_LIMITS = (
    replace(limit("total_tokens", 100, 60, "1m"), cached_weight=Fraction(1, 4)),
    limit("completion_tokens", 40, 30, "30s"),
    limit(REQUESTS, 4, 20, "20s"),
    limit("prompt_tokens", 300, 3600, "1h"),
    replace(limit(BUDGET, 2_500, 40, "40s"), models=("o4-*",)),
    replace(limit("total_tokens", 150, 60, "1m"), scope="proxy"),
)
RANDOM_RATES = Rates(2_500_000, 13_300_000)  # not whole micro-dollars per token
RANDOM_STALE_AFTER = 45.0

steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("reserve"),
            st.integers(0, 110),
            st.integers(0, 80),
            st.integers(0, 2),
            st.integers(0, 3),
        ),
        st.tuples(
            st.just("settle"),
            st.integers(0, 50),
            st.integers(0, 120),
            st.integers(0, 90),
            st.integers(0, 3_000),
        ),
        st.tuples(st.just("release"), st.integers(0, 50)),
        st.tuples(st.just("advance"), st.integers(1, 60)),
        st.tuples(st.just("tick"), st.integers(1, 8)),  # within a slot, or across its edge
        st.tuples(st.just("status"), st.integers(0, 2)),
    ),
    max_size=30,
)


async def play(store: Store, clock: FakeClock, trace: list) -> list:
    """Runs a random trace on three callers of one proxy, for a model with a budget and one
    without, a team window shared by all; returns the Recorder's log."""
    proxy = SimpleNamespace(name="p", scope="key", limits=RANDOM_LIMITS)
    scopes = (
        buckets_for(proxy, "a", "o4-mini"),
        buckets_for(proxy, "b", "gpt-4.1"),
        buckets_for(proxy, "c", "o4-mini"),
    )
    r = Recorder(store, clock)
    names: list[str] = []
    try:
        for index, (op, *args) in enumerate(trace):
            if op == "reserve":
                prompt, completion, which, least = args
                names.append(name := f"r{index}")
                demand = Demand(prompt, completion, RANDOM_RATES, least)
                await r.reserve(name, scopes[which], demand)
                if name not in r.held:
                    names.pop()
            elif op in ("settle", "release") and names:
                name = names[args[0] % len(names)]
                usage = None
                if op == "settle":
                    usage = Usage(args[1], args[2], cached_prompt=args[1] // 2, cost=args[3])
                await r.finish(name, usage)
            elif op == "advance":
                clock.advance(args[0] * 0.5)
            elif op == "tick":
                clock.advance(args[0] * 0.125)
            elif op == "status":
                await r.status(scopes[args[0]])
    finally:
        await store.close()
    return r.log


@pytest.fixture(scope="module", params=LONG_RUN_KINDS[1:])
def compared(request) -> tuple[str, str | None]:
    """A store kind to hold against memory, and the Redis URL it needs: SQLite runs wherever
    the tests do; Redis only where redis-server is installed (a skip otherwise, a failure in CI)."""
    return request.param, redis_url(request.param, request)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=steps)
def test_random_traces_agree_across_stores(trace, tmp_path_factory, compared):
    kind_, redis_url = compared
    folder = tmp_path_factory.mktemp("random")

    async def run(kind: str) -> list:
        clock = FakeClock()
        return await play(opener(kind, folder, redis_url)(clock, RANDOM_STALE_AFTER), clock, trace)

    assert asyncio.run(run(kind_)) == asyncio.run(run("memory"))


# --------------------------------------------------------------------------------------------
# Bounded state: per bucket, at most SLOTS + 1 slots and the reservations in flight


def records_held(store: Store, bucket: Bucket, url: str | None) -> tuple[int, int]:
    """(slots, reservations in flight) the store holds for `bucket`, read from its own state."""
    if isinstance(store, MemoryStore):
        window = store._windows.get(bucket.key)
        return (len(window.slots), len(window.pending)) if window else (0, 0)
    if isinstance(store, SqliteStore):
        with sqlite3.connect(store.path) as db:
            return tuple(
                db.execute(
                    f"SELECT COUNT(*) FROM {table} WHERE bucket = ?", (bucket.key,)
                ).fetchone()[0]
                for table in ("slots", "pending")
            )
    client = redis_client(url, isinstance(store.redis, RedisCluster))
    try:
        fields = client.hkeys(store.key_of(bucket))
    finally:
        client.close()
    return sum(f.startswith("slot:") for f in fields), sum(f.startswith("rid:") for f in fields)


@pytest.mark.parametrize("kind", LONG_RUN_KINDS)
async def test_state_per_bucket_is_bounded_whatever_the_traffic(kind, open_store, request):
    """10,000 requests of one key over an hour, 8 in flight, under a 1-day and a 1-minute
    limit: without slots a store would hold every charge of the day (10,000 records)."""
    url = redis_url(kind, request)
    clock = FakeClock()
    store = open_store(clock)
    day, minute = bs = buckets(total(10**9, 86_400), limit(REQUESTS, 10**6, 60))
    in_flight: list[Reservation] = []
    for index in range(10_000):
        clock.advance(0.36)
        decision, reservation = await store.reserve(f"q{index}", bs, Demand(3, 4))
        assert decision.admitted
        in_flight.append(reservation)
        if len(in_flight) > 8:
            await store.settle(in_flight.pop(0), Usage(3, 4))
    # The hour (T0 to T0 + 3600) touches 4 of the day's 22.5-minute slots.
    assert records_held(store, day, url) == (4, 8)
    slots, pending = records_held(store, minute, url)
    # Unmerged, the minute would hold 160 settled charges; the newest 8 (3 slots) are in flight.
    assert SLOTS - 4 <= slots <= SLOTS + 1 and pending == 8
    day_status, minute_status = await store.status(bs)
    assert (day_status.used, day_status.reserved) == ((10_000 - 8) * 7, 8 * 7)  # none lost
    assert minute_status.used + minute_status.reserved <= 60 / 0.36 + 3  # a slot late at most
    for reservation in in_flight:
        await store.settle(reservation, Usage(3, 4))
    clock.advance(86_400)
    assert [s.used for s in await store.status(bs)] == [0, 0]
    # An empty window holds nothing: no window object, no rows, no Redis key.
    assert records_held(store, day, url) == records_held(store, minute, url) == (0, 0)
    if isinstance(store, MemoryStore):
        assert not store._windows
    elif isinstance(store, SqliteStore):
        with sqlite3.connect(store.path) as db:
            assert db.execute("SELECT COUNT(*) FROM windows").fetchone()[0] == 0
    else:
        assert redis_keys(url, store.prefix) == []


# --------------------------------------------------------------------------------------------
# Concurrency: one atomic step per reservation, whatever the interleaving


async def test_concurrent_reserves_never_exceed_the_count(open_store):
    store = open_store(FakeClock())
    bs = buckets(total(1000), limit(REQUESTS, 20, 60))
    results = await asyncio.gather(
        *(store.reserve(f"g{i}", bs, Demand(40, 150)) for i in range(12))
    )
    admitted = sorted((d.reserved for d, _ in results if d.admitted), key=lambda u: u.completion)
    # 5 x 190 = 950, then 40 + 10: the sixth is admitted with the cap, the rest refused
    assert admitted == [Usage(40, 10)] + [Usage(40, 150)] * 5
    total_status, requests = await store.status(bs)
    assert (total_status.reserved, total_status.remaining) == (1000, 0)
    assert requests.reserved == 6


async def test_a_burst_never_reserves_a_budget_past_its_micro_dollar(open_store):
    """G2 in money: a team budget and each key's, 30 concurrent requests of two keys and two
    models with max_tokens, on every store: held at most the budget, to the micro-dollar."""
    store = open_store(FakeClock())
    proxy = SimpleNamespace(
        name="p",
        scope="key",
        limits=(replace(limit(BUDGET, 1_000_000, 3600, "1h"), scope="proxy"), CENT_1H),
    )
    dear, cheap = Rates(2_500_000, 10_000_000), Rates(150_000, 600_000)
    asks = [
        store.reserve(f"b{i}{key}", buckets_for(proxy, key), Demand(300, 800, rates))
        for i in range(15)
        for key, rates in (("alice", dear), ("bob", cheap))
    ]
    results = await asyncio.gather(*asks)
    held = {"alice": 0, "bob": 0}
    for index, (decision, reservation) in enumerate(results):
        if reservation is not None:
            held[("alice", "bob")[index % 2]] += decision.reserved.cost
    team = await store.status(buckets_for(proxy, "*")[:1])
    assert team[0].reserved == sum(held.values()) <= 1_000_000
    for key in held:
        (_, own) = await store.status(buckets_for(proxy, key))
        assert own.reserved == held[key] <= CENT_1H.count
    assert held["alice"] == 10_000  # capped to the micro-dollar, not a cent past


async def test_many_concurrent_requests_each_count_once(open_store):
    store = open_store(FakeClock())
    bs = buckets(limit(REQUESTS, 25, 60))
    results = await asyncio.gather(*(store.reserve(f"n{i}", bs, Demand(1, 1)) for i in range(60)))
    held = [reservation for _, reservation in results if reservation is not None]
    assert len(held) == 25
    await asyncio.gather(*(store.settle(reservation, Usage(1, 1)) for reservation in held))
    await asyncio.gather(*(store.settle(reservation, Usage(9, 9)) for reservation in held))
    (s,) = await store.status(bs)
    assert (s.used, s.reserved) == (25, 0)


# --------------------------------------------------------------------------------------------
# Redis


def redis_keys(url: str, prefix: str, cluster: bool = False) -> list[str]:
    """The store's keys (on every master of a cluster)."""
    client = redis_client(url, cluster)
    try:
        return sorted(client.scan_iter(f"{prefix}:*"))
    finally:
        client.close()


async def test_redis_decides_on_the_server_clock(redis_server, monkeypatch):
    client = redis_sync.Redis.from_url(redis_server.url)
    seconds, micros = client.time()
    client.close()
    server_now = seconds + micros / 1e6
    monkeypatch.setattr(time, "time", lambda: 1_000_000_000.0)  # this process's clock is off
    store = RedisStore(redis_server.url, prefix=f"t-{uuid.uuid4().hex[:12]}")
    try:
        decision, reservation = await store.reserve("a", buckets(total(100)), Demand(1, 1))
    finally:
        await store.close()
    assert server_now <= reservation.stamp < server_now + 30
    assert decision.statuses[0].reset_at == reservation.stamp + 60


async def test_redis_keys_have_ttls_and_one_slot_per_proxy(redis_server):
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    store = RedisStore(redis_server.url, FakeClock(), stale_after=30, prefix=prefix)
    proxy = SimpleNamespace(name="p", scope="key", limits=(TOTAL_100, TOTAL_1000_1H, PROMPT_50))
    try:
        for caller in ("alice", "bob"):
            bs = buckets_for(proxy, caller)
            await store.reserve(f"{caller}-1", bs, Demand(5, 5))
            _, reservation = await store.reserve(f"{caller}-2", bs, Demand(5, 5))
            await store.settle(reservation, Usage(5, 6))
    finally:
        await store.close()
    keys = redis_keys(redis_server.url, prefix)
    assert len(keys) == 2 * 3  # two callers, three limits, one hash each
    client = redis_sync.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        for key in keys:
            longest = 3600 if key.endswith("-1h") else 60
            assert 0 < client.ttl(key) <= longest + 30, key
    finally:
        client.close()
    for caller in ("alice", "bob"):  # tagged by the proxy: a key's and its team's windows
        assert len([key for key in keys if key.startswith(f"{prefix}:{{p}}:{caller}:")]) == 3
    assert len({key_slot(key.encode()) for key in keys}) == 1


async def test_redis_password_in_url(tmp_path):
    server = RedisServer(require_redis_server(), password="s3cret-pass").start()
    try:
        store = RedisStore(server.url, FakeClock())
        assert "s3cret-pass" not in repr(store) and ":***@" in store.where
        decision, _ = await store.reserve("a", buckets(total(10)), Demand(1, 1))
        assert decision.admitted
        await store.close()
        wrong = RedisStore(server.url.replace("s3cret-pass", "wrong-pass"), FakeClock())
        with pytest.raises(StoreUnavailable) as refused:
            await wrong.reserve("b", buckets(total(10)), Demand(1, 1))
        assert "wrong-pass" not in str(refused.value)
        await wrong.close()
    finally:
        server.stop()


async def test_redis_over_tls_with_a_password(tmp_path):
    pem = self_signed(tmp_path)
    server = RedisServer(require_redis_server(), password="tls-pass", tls=pem).start()
    store = RedisStore(server.url, FakeClock())
    try:
        assert server.url.startswith("rediss://")
        decision, reservation = await store.reserve("a", buckets(total(10)), Demand(1, 1))
        assert decision.admitted
        (s,) = await store.settle(reservation, Usage(2, 3))
        assert s.used == 5
    finally:
        await store.close()
        server.stop()


ROOT = Path(__file__).resolve().parents[2]
LUA = ROOT / "addons" / "tokengate_core" / "stores" / "lua"


def test_redis_scripts_ship_in_the_wheel_and_the_sdist(tmp_path):
    """A non-editable install has the Lua files: the wheel and the sdist built from this tree hold
    every one, and the store imported from the wheel alone (a zip) builds the same scripts."""
    pytest.importorskip("setuptools", reason="building a wheel needs the build backend")
    source = tmp_path / "source"
    shutil.copytree(
        ROOT / "addons" / "tokengate_core",
        source / "addons" / "tokengate_core",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    dist = tmp_path / "dist"
    for hook in ("build_wheel", "build_sdist"):  # one process each: the backend keeps state
        build = f"import sys, setuptools.build_meta as backend; backend.{hook}(sys.argv[1])"
        subprocess.run(
            [sys.executable, "-c", build, str(dist)],
            cwd=source,
            check=True,
            capture_output=True,
            timeout=120,
        )
    scripts = sorted(path.name for path in LUA.glob("*.lua"))
    assert scripts
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if name.endswith(".lua")}
    assert shipped == {f"tokengate_core/stores/lua/{name}" for name in scripts}
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        shipped = {name.split("/", 1)[1] for name in archive.getnames() if name.endswith(".lua")}
    assert shipped == {f"addons/tokengate_core/stores/lua/{name}" for name in scripts}
    read = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); "
        "from tokengate_core.stores import redis as r; "
        "print(json.dumps([r.__file__, r.RESERVE, r.SETTLE]))"
    )
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run(
        [sys.executable, "-c", read, str(wheel)],
        cwd=tmp_path,
        env=environment,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    where, reserve, settle = json.loads(found.stdout)
    assert where.startswith(str(wheel))
    assert (reserve, settle) == (RESERVE, SETTLE)


async def test_redis_scripts_are_read_once_not_per_call(redis_server, monkeypatch):
    """The scripts are read when the module is imported and registered with each client once:
    making a store and calling it reads no Lua file."""
    read = []
    for name in ("open", "read_text", "read_bytes"):
        original = getattr(Path, name)

        def reading(path, *args, original=original, **kwargs):
            if path.suffix == ".lua":
                read.append(path.name)
            return original(path, *args, **kwargs)

        monkeypatch.setattr(Path, name, reading)
    store = RedisStore(redis_server.url, FakeClock(), prefix=f"t-{uuid.uuid4().hex[:12]}")
    bs = buckets(total(100))
    try:
        for name in ("a", "b"):
            _, reservation = await store.reserve(name, bs, Demand(1, 1))
            await store.settle(reservation, Usage(1, 1))
        _, reservation = await store.reserve("c", bs, Demand(1, 1))
        await store.release(reservation)
        (s,) = await store.status(bs)
        assert (s.used, s.reserved) == (4, 0)
    finally:
        await store.close()
    assert read == []


def test_redacted_url():
    assert redacted("redis://:pw@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redacted("rediss://user:pw@host/1") == "rediss://user:***@host/1"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redacted("redis://h/0?db=1&password=pw") == "redis://h/0?db=1&password=***"


async def test_redis_down_then_back(tmp_path):
    server = RedisServer(require_redis_server()).start()
    store = RedisStore(server.url, FakeClock())
    bs = buckets(total(100))
    try:
        _, reservation = await store.reserve("a", bs, Demand(1, 1))
        server.stop()
        for call in (
            store.reserve("b", bs, Demand(1, 1)),
            store.settle(reservation, Usage(1, 1)),
            store.status(bs),
        ):
            with pytest.raises(StoreUnavailable, match="redis store"):
                await call
        server.start()  # same port, empty (no persistence): the scripts are loaded again
        decision, _ = await store.reserve("c", bs, Demand(1, 1))
        assert decision.admitted and decision.statuses[0].reserved == 2
    finally:
        await store.close()
        server.stop()


async def test_redis_frozen_raises_without_stalling_the_loop_then_recovers():
    server = RedisServer(require_redis_server()).start()
    store = RedisStore(server.url, FakeClock(), timeout=0.3)
    bs = buckets(total(100))
    ticks = 0

    async def other_flow() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    try:
        await store.status(bs)  # connected
        server.process.popen.send_signal(signal.SIGSTOP)  # a Redis that stops answering
        ticker = asyncio.create_task(other_flow())
        try:
            with pytest.raises(StoreUnavailable, match="Timeout"):
                await store.reserve("frozen", bs, Demand(1, 1))
        finally:
            ticker.cancel()
        assert ticks > 3  # the event loop kept serving other work meanwhile
        server.process.popen.send_signal(signal.SIGCONT)
        decision, _ = await store.reserve("after", bs, Demand(1, 1))
        assert decision.admitted
        # Whether the frozen reserve ran on the server once it woke is not known to the caller.
        statuses = await store.status(bs)
        assert statuses[0].reserved in (2, 4)
    finally:
        server.process.popen.send_signal(signal.SIGCONT)
        await store.close()
        server.stop()


async def test_redis_cluster_keeps_a_request_in_one_slot_and_spreads_proxies(redis_cluster):
    """Every call's keys share its proxy's hash tag (a key's windows and its team's are
    reserved in one script), so each runs on one master; the proxies spread over the masters."""
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    store = RedisStore(redis_cluster.url, FakeClock(), prefix=prefix, cluster=True)
    limits = (TOTAL_100, TOTAL_1000_1H, PROMPT_50)
    proxies = [SimpleNamespace(name=f"p{i}", scope="key", limits=limits) for i in range(12)]
    try:
        for proxy in proxies:
            for caller in ("alice", "bob"):
                buckets = buckets_for(proxy, caller)
                _, reservation = await store.reserve(caller, buckets, Demand(5, 5))
                await store.settle(reservation, Usage(5, 6))
    finally:
        await store.close()
    keys = redis_keys(redis_cluster.url, prefix, cluster=True)
    assert len(keys) == len(proxies) * 2 * 3
    masters = set()
    for proxy in proxies:
        slots = {key_slot(key.encode()) for key in keys if f"{{{proxy.name}}}" in key}
        assert len(slots) == 1
        masters.add(redis_cluster.master_of(slots.pop()).port)
    assert len(masters) > 1


async def test_redis_cluster_seeds(redis_cluster, redis_server):
    """Any seed that answers will do; none answering, or a node that is not in a cluster, is a
    store outage (no script ran), not a crash."""
    live = redis_cluster.nodes[1]
    dead = f"redis://127.0.0.1:{free_port()}/0"
    bs = buckets(total(100))
    seeded = RedisStore(dead, FakeClock(), cluster=True, cluster_nodes=(("127.0.0.1", live.port),))
    try:
        decision, _ = await seeded.reserve("a", bs, Demand(1, 1))
        assert decision.admitted
    finally:
        await seeded.close()
    for url in (dead, redis_server.url):
        store = RedisStore(url, FakeClock(), cluster=True)
        try:
            with pytest.raises(StoreUnavailable, match=r"\(cluster\)") as raised:
                await store.reserve("b", bs, Demand(1, 1))
            assert not raised.value.maybe_applied
        finally:
            await store.close()


async def test_redis_cluster_client_failing_in_any_way_is_a_store_outage(
    redis_cluster, monkeypatch
):
    """The cluster client, resetting its connections under a call in flight, has raised
    asyncio's TypeError: it must reach the gate as StoreUnavailable (its `fail` policy), not
    escape the hook and let the request through unmetered."""
    store = RedisStore(redis_cluster.url, FakeClock(), cluster=True)

    async def closed_under_it(*args, **kwargs):
        raise TypeError("'NoneType' object is not callable")

    monkeypatch.setattr(store.redis, "evalsha", closed_under_it)
    try:
        with pytest.raises(StoreUnavailable, match="TypeError") as raised:
            await store.reserve("a", buckets(total(100)), Demand(1, 1))
        assert raised.value.maybe_applied  # it may have been sent: released once back
    finally:
        await store.close()


# --------------------------------------------------------------------------------------------
# SQLite


async def test_sqlite_survives_a_restart_and_ends_a_dead_process_reservations(tmp_path):
    path = tmp_path / "state" / "usage.sqlite"  # the folder is created
    clock = FakeClock()
    bs = buckets(TOTAL_1000_1H)
    first = SqliteStore(path, clock, stale_after=100)
    _, settled = await first.reserve("a", bs, Demand(100, 100))
    await first.settle(settled, Usage(100, 50))
    _, in_flight = await first.reserve("b", bs, Demand(100, 100))
    await first.close()  # the process goes away with "b" in flight

    second = SqliteStore(path, clock, stale_after=100)  # a restart
    try:
        (s,) = await second.status(bs)
        assert (s.used, s.reserved) == (150, 200)
        clock.advance(100)
        (s,) = await second.status(bs)
        assert (s.used, s.reserved) == (350, 0)  # charged what it reserved: never lost
        (s,) = await second.settle(in_flight, Usage(1, 1))  # a late settle: not twice
        assert (s.used, s.reserved) == (350, 0)
    finally:
        await second.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_sqlite_keeps_the_books_of_a_file_written_before_slots(tmp_path):
    """An upgrade: a file with one `charges` row per reservation and bucket (the layout before
    slots) is folded into slots and pending rows on open, and nothing spent is lost."""
    path = tmp_path / "usage.sqlite"
    (minute,) = bs = buckets(total(1000))
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE charges (rid TEXT, bucket TEXT, stamp REAL, expires REAL, "
            "amount INTEGER, settled INTEGER)"
        )
        db.execute("CREATE TABLE totals (bucket TEXT, used INTEGER, reserved INTEGER)")
        db.executemany(
            "INSERT INTO charges VALUES (?, ?, ?, ?, ?, ?)",
            [
                ("a", minute.key, T0, T0 + 60, 30, 1),
                ("b", minute.key, T0 + 0.25, T0 + 60.25, 20, 1),  # a's slot
                ("c", minute.key, T0 + 10, T0 + 70, 50, 0),
            ],
        )
    clock = FakeClock(T0 + 20)
    store = SqliteStore(path, clock)
    try:
        (s,) = await store.status(bs)
        assert (s.used, s.reserved, s.reset_at) == (50, 50, T0 + 70)
        (s,) = await store.settle(Reservation("c", T0 + 10, bs, Usage(25, 25)), Usage(5, 5))
        assert (s.used, s.reserved) == (60, 0)
        clock.at(T0 + 60)  # "a" and "b" share a slot: they leave together, with "b"
        assert [s.used for s in await store.status(bs)] == [60]
        clock.at(T0 + 60.25)
        assert [s.used for s in await store.status(bs)] == [10]
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    assert "charges" not in tables and "totals" not in tables


async def test_sqlite_two_stores_on_one_file_stay_within_the_limit(tmp_path):
    path = tmp_path / "usage.sqlite"
    one, two = SqliteStore(path, FakeClock()), SqliteStore(path, FakeClock())
    bs = buckets(limit(REQUESTS, 30, 60))
    try:
        results = await asyncio.gather(
            *((one, two)[i % 2].reserve(f"x{i}", bs, Demand(1, 1)) for i in range(80))
        )
        assert sum(1 for decision, _ in results if decision.admitted) == 30
        (s,) = await two.status(bs)
        assert s.reserved == 30
    finally:
        await one.close()
        await two.close()


async def test_sqlite_operations_queued_together_fail_alone(tmp_path):
    """Operations queued at once share the worker's next transaction, each in a savepoint: one
    that fails (a reservation id already held) answers its own error and the others stand."""
    store = SqliteStore(tmp_path / "usage.sqlite", FakeClock())
    bs = buckets(total(1000))
    try:
        await store.reserve("twice", bs, Demand(1, 1))
        answers = await asyncio.gather(
            *(store.reserve(name, bs, Demand(1, 1)) for name in ("a", "twice", "b", "c")),
            return_exceptions=True,
        )
        assert isinstance(answers[1], StoreUnavailable)
        assert [answers[i][0].admitted for i in (0, 2, 3)] == [True, True, True]
        (s,) = await store.status(bs)
        assert s.reserved == 2 * 4  # "twice" once, "a", "b", "c"
    finally:
        await store.close()
    reopened = SqliteStore(tmp_path / "usage.sqlite", FakeClock())  # and they were committed
    try:
        assert [s.reserved for s in await reopened.status(bs)] == [8]
    finally:
        await reopened.close()


async def test_sqlite_operations_queued_while_the_worker_is_busy_share_one_drain(tmp_path):
    """The worker is handed one drain for all the operations queued before it starts: the event
    loop submits no work item per operation. Once it started, the next operation gets its own."""
    store = SqliteStore(tmp_path / "usage.sqlite", FakeClock())
    bs = buckets(total(1000))
    busy = threading.Event()
    submitted = []
    try:
        blocked = asyncio.get_running_loop().run_in_executor(store._worker, busy.wait, 10)
        submit = store._worker.submit
        store._worker.submit = lambda *args: submitted.append(args) or submit(*args)
        calls = [asyncio.create_task(store.reserve(f"r{i}", bs, Demand(1, 1))) for i in range(20)]
        await asyncio.sleep(0.05)  # every call queued its operation, behind the busy worker
        assert len(submitted) == 1
        busy.set()
        await blocked
        answers = await asyncio.wait_for(asyncio.gather(*calls), 10)
        assert all(decision.admitted for decision, _ in answers)
        (s,) = await asyncio.wait_for(store.status(bs), 10)
        assert s.reserved == 2 * 20 and len(submitted) == 2
    finally:
        busy.set()
        await store.close()


async def test_sqlite_calls_after_close_raise_every_time(tmp_path):
    store = SqliteStore(tmp_path / "usage.sqlite", FakeClock())
    bs = buckets(total(1000))
    await store.reserve("a", bs, Demand(1, 1))
    await store.close()
    for name in ("b", "c"):
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(store.reserve(name, bs, Demand(1, 1)), 10)


async def test_sqlite_two_stores_opening_a_new_file_at_once_both_work(tmp_path):
    """Two gateways starting together on a new file race to switch it to WAL; neither fails,
    both reservations are in the one file, and the file is in WAL mode."""
    for attempt in range(40):
        path = tmp_path / f"new-{attempt}.sqlite"
        one, two = SqliteStore(path, FakeClock()), SqliteStore(path, FakeClock())
        bs = buckets(total(100))
        try:
            answers = await asyncio.gather(
                one.reserve("a", bs, Demand(1, 1)), two.reserve("b", bs, Demand(1, 1))
            )
            assert [decision.admitted for decision, _ in answers] == [True, True], attempt
            for store in (one, two):
                assert [s.reserved for s in await store.status(bs)] == [4], attempt
        finally:
            await one.close()
            await two.close()
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",), attempt


async def test_sqlite_unusable_file_raises_then_recovers(tmp_path):
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state folder should be")
    store = SqliteStore(blocker / "usage.sqlite", FakeClock())
    bs = buckets(total(100))
    try:
        with pytest.raises(StoreUnavailable, match="sqlite store"):
            await store.reserve("a", bs, Demand(1, 1))
        blocker.unlink()
        assert (await store.reserve("b", bs, Demand(1, 1)))[0].admitted
    finally:
        await store.close()


async def test_sqlite_locked_past_the_busy_timeout_raises_then_recovers(tmp_path):
    path = tmp_path / "usage.sqlite"
    store = SqliteStore(path, FakeClock(), busy_timeout=0.1)
    bs = buckets(total(100))
    try:
        await store.status(bs)  # creates the file
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.reserve("a", bs, Demand(1, 1))
        other.execute("ROLLBACK")
        other.close()
        assert (await store.reserve("b", bs, Demand(1, 1)))[0].admitted
    finally:
        await store.close()
