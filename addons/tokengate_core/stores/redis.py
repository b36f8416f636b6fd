"""Charges in Redis, shared by several mitmdump instances.

Each request is one Lua script (reserve, or settle/release), so it is atomic across all the
limits of the request, and decided on the Redis server's clock (`TIME`): instances whose clocks
disagree still agree on the windows. The scripts apply the rules of `limiter.decide_on` (minimum
per dimension, completion capped by what is left, debt kept, `fits_at` for the retry time); the
conformance suite (tests/test_stores.py) holds them to the memory store's decisions.

Per bucket, four keys: `charges` (reservation id -> stamp, sorted), `amounts` (id -> amount),
`pending` (the unsettled ids, by stamp, so stale ones are found from the front) and `totals`
(running `used` and `reserved`, so a decision does not sum the window). Every key is hash-tagged
with the bucket's `proxy:scope` (`tokengate:{proxy:alice}:total_tokens-1m:charges`): all the
buckets of one request, which share that scope, live in one slot, so the scripts could run on
Redis Cluster unchanged (the client here is the single-node one; a Cluster client is not wired).
Every key gets a TTL of its window plus `stale_after`, refreshed on each write.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..limiter import Bucket, Decision, Demand, LimitStatus, Usage
from . import STALE_AFTER, Reservation, StoreUnavailable

TIMEOUT = 1.0  # seconds for connecting and for each reply: a store that is down answers fast
KEY_PARTS = ("charges", "amounts", "pending", "totals")

# Shared by both scripts. KEYS hold four keys per bucket, in KEY_PARTS order.
_COMMON = """
local function clock(arg)
    if arg ~= '' then return tonumber(arg) end
    local t = redis.call('TIME')
    return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function keys_of(i)
    local base = (i - 1) * 4
    return {charges = KEYS[base + 1], amounts = KEYS[base + 2],
            pending = KEYS[base + 3], totals = KEYS[base + 4]}
end

local function amount_of(dimension, prompt, completion)
    if dimension == 'prompt_tokens' then return prompt end
    if dimension == 'completion_tokens' then return completion end
    if dimension == 'total_tokens' then return prompt + completion end
    return 1
end

-- Drop expired charges (stamp + seconds <= now) and count stale reservations
-- (stamp + stale <= now) as settled. The score bound has a second of slack; the test in the
-- loop is exact, with the same arithmetic as the other stores.
local function prune(k, seconds, stale, now)
    local used, reserved = 0, 0
    local old = redis.call('ZRANGEBYSCORE', k.charges, '-inf', now - seconds + 1, 'WITHSCORES')
    for i = 1, #old, 2 do
        local id, stamp = old[i], tonumber(old[i + 1])
        if stamp + seconds > now then break end
        local amount = tonumber(redis.call('HGET', k.amounts, id))
        redis.call('ZREM', k.charges, id)
        redis.call('HDEL', k.amounts, id)
        if redis.call('ZREM', k.pending, id) == 1 then
            reserved = reserved - amount
        else
            used = used - amount
        end
    end
    local due = redis.call('ZRANGEBYSCORE', k.pending, '-inf', now - stale + 1, 'WITHSCORES')
    for i = 1, #due, 2 do
        local id, stamp = due[i], tonumber(due[i + 1])
        if stamp + stale > now then break end
        local amount = tonumber(redis.call('HGET', k.amounts, id))
        redis.call('ZREM', k.pending, id)
        reserved = reserved - amount
        used = used + amount
    end
    if redis.call('ZCARD', k.charges) == 0 then
        redis.call('DEL', k.amounts, k.pending, k.totals)
        return
    end
    if used ~= 0 then redis.call('HINCRBY', k.totals, 'used', used) end
    if reserved ~= 0 then redis.call('HINCRBY', k.totals, 'reserved', reserved) end
end

-- used, reserved, newest stamp (nil when empty)
local function window(k)
    local totals = redis.call('HMGET', k.totals, 'used', 'reserved')
    local newest = redis.call('ZRANGE', k.charges, -1, -1, 'WITHSCORES')
    return tonumber(totals[1]) or 0, tonumber(totals[2]) or 0, tonumber(newest[2])
end

local function refresh(k, ttl)
    for _, key in pairs(k) do redis.call('EXPIRE', key, ttl) end
end

local function exact(x) return string.format('%.17g', x) end

local function status_reply(out, k, seconds, now)
    local used, reserved, newest = window(k)
    out[#out + 1] = used
    out[#out + 1] = reserved
    out[#out + 1] = exact(newest and newest + seconds or now)
end
"""

# ARGV: now ('' = server TIME), stale_after, reservation id, prompt, completion, then per bucket:
# dimension, count, seconds. Reply: admitted, stamp, prompt, completion, blocking (1-based,
# 0 = none), retry_at ('' = never), then per bucket: used, reserved, reset_at.
RESERVE = (
    _COMMON
    + """
local now, stale, id = clock(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local prompt, completion = tonumber(ARGV[4]), tonumber(ARGV[5])
local n = #KEYS / 4
local limits, statuses = {}, {}
for i = 1, n do
    local k = keys_of(i)
    local at = 6 + (i - 1) * 3
    local lim = {dimension = ARGV[at], count = tonumber(ARGV[at + 1]),
                 seconds = tonumber(ARGV[at + 2]), k = k}
    if redis.call('HEXISTS', k.amounts, id) == 1 then
        return redis.error_reply('reservation id already held: ' .. id)
    end
    prune(k, lim.seconds, stale, now)
    lim.used, lim.reserved, lim.newest = window(k)
    lim.remaining = math.max(0, lim.count - lim.used - lim.reserved)
    limits[i] = lim
end

-- limiter.fits_at: the earliest time >= now at which `need` fits, nil if never
local function fits_at(lim, need)
    if need > lim.count then return nil end
    local live = redis.call('ZRANGE', lim.k.charges, 0, -1, 'WITHSCORES')
    local amounts, held = {}, 0
    for i = 1, #live, 2 do
        amounts[i] = tonumber(redis.call('HGET', lim.k.amounts, live[i]))
        held = held + amounts[i]
    end
    if lim.count - held >= need then return now end
    for i = 1, #live, 2 do
        held = held - amounts[i]
        if lim.count - held >= need then return tonumber(live[i + 1]) + lim.seconds end
    end
    return now
end

-- limiter.decide_on: every window must have room for the request's minimum
local never, blocking, retry_at = nil, nil, nil
for i, lim in ipairs(limits) do
    local need = 1
    if lim.dimension == 'prompt_tokens' or lim.dimension == 'total_tokens' then
        need = math.max(1, prompt)
    end
    if lim.remaining < need then
        local at = fits_at(lim, need)
        if at == nil then
            never = never or i
        elseif retry_at == nil or at > retry_at then
            blocking, retry_at = i, at
        end
    end
end

local out
if never or blocking then
    if never then blocking, retry_at = never, nil end
    out = {0, '', 0, 0, blocking, retry_at and exact(retry_at) or ''}
    for i, lim in ipairs(limits) do
        out[#out + 1] = lim.used
        out[#out + 1] = lim.reserved
        out[#out + 1] = exact(lim.newest and lim.newest + lim.seconds or now)
    end
    return out
end

for _, lim in ipairs(limits) do
    if lim.dimension == 'total_tokens' then
        completion = math.min(completion, lim.remaining - prompt)
    elseif lim.dimension == 'completion_tokens' then
        completion = math.min(completion, lim.remaining)
    end
end
completion = math.max(0, completion)
local stamp = now  -- stamps never go backwards in a window, even if a clock does
for _, lim in ipairs(limits) do
    if lim.newest and lim.newest > stamp then stamp = lim.newest end
end
out = {1, exact(stamp), prompt, completion, 0, ''}
for _, lim in ipairs(limits) do
    local k = lim.k
    local amount = amount_of(lim.dimension, prompt, completion)
    redis.call('ZADD', k.charges, stamp, id)
    redis.call('HSET', k.amounts, id, amount)
    redis.call('ZADD', k.pending, stamp, id)
    redis.call('HINCRBY', k.totals, 'reserved', amount)
    refresh(k, math.ceil(lim.seconds + stale))
    status_reply(out, k, lim.seconds, now)
end
return out
"""
)

# ARGV: now ('' = server TIME), stale_after, reservation id, mode (settle | release | status),
# prompt, completion, then per bucket: dimension, seconds. Reply per bucket: used, reserved,
# reset_at. Only a pending reservation changes, so a second settle or release does nothing.
SETTLE = (
    _COMMON
    + """
local now, stale, id, mode = clock(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local prompt, completion = tonumber(ARGV[5]), tonumber(ARGV[6])
local out = {}
for i = 1, #KEYS / 4 do
    local k = keys_of(i)
    local dimension, seconds = ARGV[7 + (i - 1) * 2], tonumber(ARGV[8 + (i - 1) * 2])
    prune(k, seconds, stale, now)
    if mode ~= 'status' and redis.call('ZREM', k.pending, id) == 1 then
        local held = tonumber(redis.call('HGET', k.amounts, id))
        redis.call('HINCRBY', k.totals, 'reserved', 0 - held)  -- -0 is no integer
        if mode == 'release' then
            redis.call('ZREM', k.charges, id)
            redis.call('HDEL', k.amounts, id)
            if redis.call('ZCARD', k.charges) == 0 then
                redis.call('DEL', k.amounts, k.pending, k.totals)
            end
        else
            local amount = amount_of(dimension, prompt, completion)
            redis.call('HSET', k.amounts, id, amount)
            redis.call('HINCRBY', k.totals, 'used', amount)
        end
        refresh(k, math.ceil(seconds + stale))
    end
    status_reply(out, k, seconds, now)
end
return out
"""
)


def redacted(url: str) -> str:
    """The URL without its password (in the user part or a `password=` query), for messages."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        netloc = f"{parts.username or ''}:***@{host}"
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


class RedisStore:
    """See the module docstring. `clock=None` decides on the server's clock (what a gate wants);
    a clock given here (tests with a fake clock) is sent with every call instead."""

    def __init__(
        self,
        url: str,
        clock: Callable[[], float] | None = None,
        stale_after: float = STALE_AFTER,
        prefix: str = "tokengate",
        timeout: float = TIMEOUT,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the key prefix may not contain braces (they make the hash tag)")
        self.where = redacted(url)
        self.clock = clock
        self.stale_after = stale_after
        self.prefix = prefix
        # No retries: a reserve sent twice would hold twice, and a store that is down should
        # say so at once; a pooled connection the server closed is replaced when taken.
        self.redis = redis.asyncio.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        self._reserve = self.redis.register_script(RESERVE)
        self._settle = self.redis.register_script(SETTLE)
        self._keys: dict[str, list[str]] = {}

    def __repr__(self) -> str:
        return f"RedisStore({self.where!r}, prefix={self.prefix!r})"

    def keys_of(self, bucket: Bucket) -> list[str]:
        """The bucket's four keys, tagged by its `proxy:scope` (the key up to its last colon)."""
        keys = self._keys.get(bucket.key)
        if keys is None:
            scope, _, limit = bucket.key.rpartition(":")
            base = f"{self.prefix}:{{{scope or bucket.key}}}:{limit}"
            keys = self._keys[bucket.key] = [f"{base}:{part}" for part in KEY_PARTS]
        return keys

    def _now(self) -> str:
        return "" if self.clock is None else repr(float(self.clock()))

    async def _call(self, script, buckets: tuple[Bucket, ...], args: list) -> list:
        keys = [key for bucket in buckets for key in self.keys_of(bucket)]
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as e:
            message = f"redis store {self.where}: {type(e).__name__}: {e}"
            # Unless the connection was never made, the script may have run on the server.
            raise StoreUnavailable(message, maybe_applied=not _never_sent(e)) from e

    @staticmethod
    def _statuses(buckets: tuple[Bucket, ...], reply: list) -> tuple[LimitStatus, ...]:
        return tuple(
            LimitStatus(bucket.limit, int(used), int(reserved), float(reset_at))
            for bucket, used, reserved, reset_at in zip(
                buckets, reply[0::3], reply[1::3], reply[2::3], strict=True
            )
        )

    async def reserve(
        self, reservation_id: str, buckets: tuple[Bucket, ...], demand: Demand
    ) -> tuple[Decision, Reservation | None]:
        args = [self._now(), self.stale_after, reservation_id, demand.prompt, demand.completion]
        for bucket in buckets:
            args += [bucket.limit.dimension, bucket.limit.count, bucket.limit.seconds]
        reply = await self._call(self._reserve, buckets, args)
        admitted, stamp, prompt, completion, blocking, retry_at = reply[:6]
        statuses = self._statuses(buckets, reply[6:])
        if not int(admitted):
            retry = float(retry_at) if retry_at else None
            return Decision(False, statuses, blocking=statuses[blocking - 1], retry_at=retry), None
        amounts = Usage(int(prompt), int(completion))
        decision = Decision(True, statuses, reserved=amounts)
        return decision, Reservation(reservation_id, float(stamp), buckets, amounts)

    async def _replace(
        self, mode: str, buckets: tuple[Bucket, ...], reservation_id: str, usage: Usage
    ) -> tuple[LimitStatus, ...]:
        args = [self._now(), self.stale_after, reservation_id, mode, usage.prompt, usage.completion]
        for bucket in buckets:
            args += [bucket.limit.dimension, bucket.limit.seconds]
        return self._statuses(buckets, await self._call(self._settle, buckets, args))

    async def settle(self, reservation: Reservation, usage: Usage) -> tuple[LimitStatus, ...]:
        return await self._replace("settle", reservation.buckets, reservation.id, usage)

    async def release(self, reservation: Reservation) -> tuple[LimitStatus, ...]:
        return await self._replace("release", reservation.buckets, reservation.id, Usage(0, 0))

    async def status(self, buckets: tuple[Bucket, ...]) -> tuple[LimitStatus, ...]:
        return await self._replace("status", buckets, "", Usage(0, 0))

    async def close(self) -> None:
        """Close the connection pool; call once at shutdown."""
        await self.redis.aclose()


def _never_sent(error: Exception) -> bool:
    """True when the connection itself failed, so no script reached the server.

    redis-py words every failed connect as "... connecting to ..." ("Error 111 connecting to
    127.0.0.1:6379. Connection refused.", "Timeout connecting to server").
    """
    return "connecting to" in str(error)
