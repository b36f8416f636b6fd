"""The learned correction of prompt estimates (estimates.py): the decayed maximum, the cold
margin, absurd ratios, and what each store keeps of it (memory, SQLite, a real redis-server)."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
import redis as redis_sync
from redis.crc import key_slot
from tokengate_core import estimates
from tokengate_core.estimates import (
    DEFAULT_MARGIN,
    EMPTY,
    MAX_RATIO,
    MAX_RECORDS,
    MIN_ESTIMATE,
    MIN_RATIO,
    RELEASE,
    Estimates,
    Policy,
    Record,
    corrected,
    fold,
    key_of,
    ratio,
)
from tokengate_core.limiter import Usage
from tokengate_core.stores import StoreUnavailable
from tokengate_core.stores.memory import MemoryStore
from tokengate_core.stores.redis import LEARN_ATTEMPTS, RedisStore
from tokengate_core.stores.sqlite import SqliteStore
from tokengate_core.usage import Metered

LOCAL = "llama-3.1-8b"  # not in tiktoken's table: the estimate uses a fallback encoding
OPENAI = "gpt-4o-mini"  # in it: the estimate is the model's own tokenizer


def reported(prompt: int) -> Metered:
    return Metered(Usage(prompt, 5), "reported")


# -- the rule ---------------------------------------------------------------------------------


def test_a_higher_ratio_raises_the_bound_at_once_a_lower_one_pulls_it_down_slowly():
    record = fold(None, [1.0, 1.3])
    assert record == Record(2, 1.3)
    lower = record.seen(1.0)
    assert lower.bound == pytest.approx(1.3 - 0.3 * RELEASE)
    # Thirty-odd answers at 1.0 bring it most of the way back: a changed provider is followed.
    later = fold(record, [1.0] * 32)
    assert 1.0 < later.bound < 1.0 + 0.3 * 0.4


def test_the_bound_is_a_high_quantile_not_the_mean():
    """Ratios drawn at random (another tokenizer on varied text): most answers fall under the
    bound, and what exceeds it is small against the slack of the others, so a burst's sum of
    (reported - reserved) stays below zero."""
    rng = random.Random(7)
    record, under, excess, slack = None, 0, 0.0, 0.0
    draws = [rng.gauss(1.1, 0.03) for _ in range(20_000)]
    for index, draw in enumerate(draws):
        if index >= 200:  # warm
            under += draw <= record.bound
            excess += max(0.0, draw - record.bound)
            slack += max(0.0, record.bound - draw)
        record = fold(record, [draw])
    share = under / (len(draws) - 200)
    assert share >= 0.85, share
    assert excess < slack / 10
    assert record.bound > 1.1  # above the mean


def test_absurd_ratios_are_clamped_and_nothing_is_learned_without_two_counts():
    assert ratio(100, 10**9) == MAX_RATIO
    assert ratio(10**6, 1) == MIN_RATIO
    assert ratio(0, 10) is None
    assert ratio(100, 0) is None
    assert ratio(MIN_ESTIMATE - 1, MIN_ESTIMATE) is None  # a token's rounding, not a rule
    assert ratio(90, 100) == pytest.approx(100 / 90)


def test_the_correction_rounds_up_without_float_noise():
    assert corrected(10, 1.1) == 11  # 10 * 1.1 is 11.000000000000002
    assert corrected(9, 10 / 9) == 10
    assert corrected(100, 0.9) == 90
    assert corrected(1, 0.25) == 1  # never below one token
    assert corrected(0, 2.0) == 0


def test_cold_margin_then_the_learned_bound():
    policy = Policy(margin=1.25, warmup=3)
    assert policy.factor(None, LOCAL) == 1.25
    assert policy.factor(None, OPENAI) == 1.0  # its own tokenizer: no margin
    assert policy.factor(None, "text-davinci-003") == 1.25  # its encoding is not shipped
    # Cold, a lower ratio does not yet lower the margin; a higher one counts at once.
    assert policy.factor(fold(None, [0.9, 0.9]), LOCAL) == 1.25
    assert policy.factor(fold(None, [1.6]), LOCAL) == 1.6
    assert policy.factor(fold(None, [1.1]), OPENAI) == 1.1
    # Warm: the bound alone, below 1 too.
    assert policy.factor(fold(None, [0.9] * 3), LOCAL) == 0.9
    assert Policy().margin == DEFAULT_MARGIN


def test_an_estimate_with_its_own_margin_gets_no_cold_margin_on_top():
    """Anthropic's estimate is tiktoken's times the dialect's margin: cold, it is taken as it
    is; what is learned still corrects it."""
    policy = Policy(margin=1.25, warmup=3)
    assert policy.factor(None, "claude-sonnet-4-5", has_margin=True) == 1.0
    assert policy.factor(fold(None, [1.3]), "claude-sonnet-4-5", has_margin=True) == 1.3
    assert policy.factor(fold(None, [0.8] * 3), "claude-sonnet-4-5", has_margin=True) == 0.8


def test_stored_records_that_do_not_read_are_ignored():
    assert Record.parse(Record(3, 1.2).text()) == Record(3, 1.2)
    for text in (None, "", "x", "[]", '{"answers": 1}', '{"answers": -1, "bound": 1}',
                 '{"answers": true, "bound": 1}', '{"answers": 1, "bound": 99}',
                 '{"answers": 1, "bound": "1"}'):  # fmt: skip
        assert Record.parse(text) is None, text


# -- what the gate learns from ----------------------------------------------------------------


def test_only_reported_prompt_counts_of_whole_estimates_teach():
    learned = Estimates(MemoryStore)
    learned.answered("local", LOCAL, 100, Metered(Usage(150, 5), "estimated"))
    learned.answered("local", LOCAL, 100, reported(150), exact=False)  # bounded by bytes
    learned.answered("local", LOCAL, 100, None)  # released: nothing was billed
    assert learned.record("local", LOCAL) is None
    learned.answered("local", LOCAL, 100, reported(150))
    assert learned.record("local", LOCAL) == Record(1, 1.5)
    assert learned.prompt("local", LOCAL, 100) == 150  # cold, but above the margin
    assert learned.record("other", LOCAL) is None  # per provider
    assert learned.prompt("other", LOCAL, 100) == 125


def test_records_are_bounded_in_number():
    learned = Estimates(MemoryStore)
    for index in range(MAX_RECORDS + 5):
        learned.answered("p", f"model-{index}", 100, reported(110))
    assert learned.record("p", f"model-{MAX_RECORDS - 1}") is not None
    assert learned.record("p", f"model-{MAX_RECORDS}") is None


# -- kept in the store ------------------------------------------------------------------------


@pytest.fixture(params=("memory", "sqlite", "redis"))
def reopen(request, tmp_path):
    """A function opening the same store again (as a restart or another gateway would)."""
    if request.param == "memory":
        store = MemoryStore()
        return lambda: store
    if request.param == "sqlite":
        return lambda: SqliteStore(tmp_path / "usage.sqlite3")
    url = request.getfixturevalue("redis_server").url
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    return lambda: RedisStore(url, prefix=prefix)


async def test_what_was_learned_survives_a_restart_and_is_shared(reopen):
    first_store = reopen()
    first = Estimates(lambda: first_store)
    for _ in range(5):
        first.answered("local", LOCAL, 100, reported(110))
    await first.sync()
    await first_store.close()

    second_store = reopen()  # a restart, or a second gateway
    second = Estimates(lambda: second_store)
    await second.sync()
    assert second.record("local", LOCAL) == Record(5, 1.1)
    for _ in range(3):  # the second gateway learns more, and higher
        second.answered("local", LOCAL, 100, reported(130))
    await second.sync()

    first_store = reopen()
    first = Estimates(lambda: first_store)
    await first.sync()
    assert first.record("local", LOCAL) == Record(8, 1.3)
    assert first.prompt("local", LOCAL, 100) == 130  # warm (8 answers): the bound
    await first_store.close()
    await second_store.close()


async def test_answers_that_come_during_a_sync_are_kept():
    class Slow(MemoryStore):
        async def learn(self, updates):
            await asyncio.sleep(0.01)  # a store call that takes a while
            return await super().learn(updates)

    store = Slow()
    learned = Estimates(lambda: store)
    learned.answered("local", LOCAL, 100, reported(120))
    syncing = asyncio.ensure_future(learned.sync())
    await asyncio.sleep(0)  # the batch is taken and sent
    learned.answered("local", LOCAL, 100, reported(140))
    await syncing
    assert learned.record("local", LOCAL) == Record(2, 1.4)
    await learned.sync()
    assert Record.parse((await store.learned())[key_of("local", LOCAL)]) == Record(2, 1.4)


async def test_a_store_that_is_down_keeps_the_answers_for_the_next_sync():
    class Down(MemoryStore):
        up = False

        async def learn(self, updates):
            if not self.up:
                raise StoreUnavailable("down")
            return await super().learn(updates)

    store = Down()
    learned = Estimates(lambda: store)
    learned.answered("local", LOCAL, 100, reported(120))
    await learned.sync()
    assert learned.record("local", LOCAL) == Record(1, 1.2)  # still used here
    assert await store.learned() == {}
    store.up = True
    await learned.sync()
    assert Record.parse((await store.learned())[key_of("local", LOCAL)]) == Record(1, 1.2)


async def test_redis_keeps_the_records_in_one_hash_slot_and_retries_a_lost_race(redis_server):
    store = RedisStore(redis_server.url, prefix=f"t-{uuid.uuid4().hex[:12]}")
    other = redis_sync.Redis.from_url(redis_server.url, decode_responses=True)
    key = key_of("local", LOCAL)
    calls = []

    def update(text):
        calls.append(text)
        if len(calls) == 1:  # another gateway writes between the read and the write
            other.hset(store.learned_key, key, Record(4, 1.5).text())
        return fold(Record.parse(text), [1.0]).text()

    records = await store.learn({key: update})
    assert calls == [None, Record(4, 1.5).text()]
    assert Record.parse(records[key]) == Record(4, 1.5).seen(1.0)
    assert "{learned}" in store.learned_key  # one hash tag: one slot, also on Redis Cluster
    assert key_slot(store.learned_key.encode()) == key_slot(b"{learned}")
    assert other.ttl(store.learned_key) > 0

    def always_raced(text):
        other.hset(store.learned_key, key, str(uuid.uuid4()))
        return EMPTY.text()

    with pytest.raises(StoreUnavailable):
        await store.learn({key: always_raced})
    assert len(calls) == 2 and LEARN_ATTEMPTS > 1
    other.close()
    await store.close()


async def test_answers_reach_the_store_in_the_background_until_closed(monkeypatch):
    monkeypatch.setattr(estimates, "SYNC_SECONDS", 0.01)
    store = MemoryStore()
    learned = Estimates(lambda: store)
    learned.answered("local", LOCAL, 100, reported(120))
    await asyncio.sleep(0.1)  # no one calls sync: the gate's own task does
    assert Record.parse((await store.learned())[key_of("local", LOCAL)]) == Record(1, 1.2)

    learned.answered("local", LOCAL, 100, reported(130))
    await learned.close()  # what is left is sent now
    assert Record.parse((await store.learned())[key_of("local", LOCAL)]) == Record(2, 1.3)
    learned.answered("local", LOCAL, 100, reported(140))
    await asyncio.sleep(0.1)
    assert Record.parse((await store.learned())[key_of("local", LOCAL)]) == Record(2, 1.3)
