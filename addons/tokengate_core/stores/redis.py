"""Charges in Redis, shared by several mitmdump instances.

Each request is one Lua script (reserve, or settle/release), so it is atomic across all the
limits of the request, and decided on the Redis server's clock (`TIME`): instances whose clocks
disagree still agree on the windows. The scripts apply the rules of `limiter.decide_on` (minimum
per dimension, completion capped by what is left, debt kept, `fits_at` for the retry time); the
conformance suite (tests/test_stores.py) holds them to the memory store's decisions.

Per bucket, one hash (`tokengate:{proxy:alice}:total_tokens#0`): its head (`used`, `reserved`,
`newest` stamp, lower bounds `oldest` and `since` on the oldest stamp and the oldest pending
one), its settled charges merged into slots (`slot:<duration>:<slot>` -> "stamp amount", as
`limiter.slot_of` and `limiter.merged` say) and its reservations in flight (`rid:<id>` -> "stamp
amount"). A call reads the heads; the other fields are read only when the lower bounds say
something may have left the window or gone stale, and by a refused request. The key is
hash-tagged with the bucket's `proxy:scope`: all the buckets of one request, which share that
scope, live in one slot, so the scripts could run on Redis Cluster unchanged (the client here
is the single-node one; a Cluster client is not wired). Every key gets a TTL of its window plus
`stale_after`, refreshed on each write, and is deleted when its window empties.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..limiter import SLOTS, Bucket, Decision, Demand, LimitStatus, Usage
from . import STALE_AFTER, Reservation, StoreUnavailable

TIMEOUT = 1.0  # seconds for connecting and for each reply: a store that is down answers fast

# Shared by both scripts. KEYS hold one hash per bucket.
_COMMON = """
local SLOTS = @SLOTS@

local function clock(arg)
    if arg ~= '' then return tonumber(arg) end
    local t = redis.call('TIME')
    return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function amount_of(dimension, prompt, completion)
    if dimension == 'prompt_tokens' then return prompt end
    if dimension == 'completion_tokens' then return completion end
    if dimension == 'total_tokens' then return prompt + completion end
    return 1
end

local function exact(x) return string.format('%.17g', x) end

local function pair(value)
    local stamp, amount = string.match(value, '^(%S+) (%S+)$')
    return tonumber(stamp), tonumber(amount)
end

-- limiter.slot_of and limiter.merged: the slot a settled charge joins, and the slot's value
-- after (the newest stamp merged into it, the sum of the amounts), as field and value
local function merged(key, seconds, stamp, amount)
    local slot = math.floor(stamp * SLOTS / seconds)
    local field = 'slot:' .. seconds .. ':' .. string.format('%.0f', slot)
    local held = redis.call('HGET', key, field)
    if held then
        local was, sum = pair(held)
        if was > stamp then stamp = was end
        amount = amount + sum
    end
    return field, exact(stamp) .. ' ' .. exact(amount)
end

-- used, reserved, newest, oldest, since (nil when the window is empty), and the value of
-- one more field read in the same call
local function head(key, field)
    local h = redis.call('HMGET', key, 'used', 'reserved', 'newest', 'oldest', 'since', field)
    if not h[3] then return nil, h[6] end
    return {used = tonumber(h[1]), reserved = tonumber(h[2]), newest = tonumber(h[3]),
            oldest = tonumber(h[4]), since = tonumber(h[5])}, h[6]
end

-- every slot and reservation of a window
local function records(key)
    local all, out = redis.call('HGETALL', key), {}
    for i = 1, #all, 2 do
        local field = all[i]
        local settled = string.sub(field, 1, 5) == 'slot:'
        if settled or string.sub(field, 1, 4) == 'rid:' then
            local stamp, amount = pair(all[i + 1])
            out[#out + 1] = {field = field, stamp = stamp, amount = amount, settled = settled}
        end
    end
    return out
end

-- the head written anew from the records; nil (and the key deleted) when nothing is left
local function rebuild(key)
    local h = {used = 0, reserved = 0}
    for _, r in ipairs(records(key)) do
        if r.settled then
            h.used = h.used + r.amount
        else
            h.reserved = h.reserved + r.amount
            if not h.since or r.stamp < h.since then h.since = r.stamp end
        end
        if not h.newest or r.stamp > h.newest then h.newest = r.stamp end
        if not h.oldest or r.stamp < h.oldest then h.oldest = r.stamp end
    end
    if not h.newest then
        redis.call('DEL', key)
        return nil
    end
    redis.call('HSET', key, 'used', h.used, 'reserved', h.reserved,
               'newest', exact(h.newest), 'oldest', exact(h.oldest))
    if h.since then
        redis.call('HSET', key, 'since', exact(h.since))
    else
        redis.call('HDEL', key, 'since')
    end
    return h
end

-- memory.Window.prune: drop what left the window (stamp + seconds <= now), then count stale
-- reservations (stamp + stale <= now) as settled; only when the head's bounds say one is due
local function prune(key, h, seconds, stale, now)
    if not h or (h.oldest + seconds > now and not (h.since and h.since + stale <= now)) then
        return h
    end
    local live = {}
    for _, r in ipairs(records(key)) do
        if r.stamp + seconds <= now then
            redis.call('HDEL', key, r.field)
        elseif not r.settled then
            live[#live + 1] = r
        end
    end
    for _, r in ipairs(live) do
        if r.stamp + stale <= now then
            redis.call('HDEL', key, r.field)
            redis.call('HSET', key, merged(key, seconds, r.stamp, r.amount))
        end
    end
    return rebuild(key)
end

local function status_reply(out, h, seconds, now)
    out[#out + 1] = exact(h and h.used or 0)
    out[#out + 1] = exact(h and h.reserved or 0)
    out[#out + 1] = exact(h and h.newest + seconds or now)
end
""".replace("@SLOTS@", str(SLOTS))

# Replies are one string of space-separated words: one bulk reply is cheaper for the client to
# read than an array of them.

# ARGV: now ('' = server TIME), stale_after, reservation id, prompt, completion, then per bucket:
# dimension, count, seconds. Reply: admitted, stamp ('-' = refused), prompt, completion, blocking
# (1-based, 0 = none), retry_at ('-' = never), then per bucket: used, reserved, reset_at.
RESERVE = (
    _COMMON
    + """
local now, stale, id = clock(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local prompt, completion = tonumber(ARGV[4]), tonumber(ARGV[5])
local field = 'rid:' .. id
local limits = {}
for i = 1, #KEYS do
    local at = 6 + (i - 1) * 3
    local lim = {key = KEYS[i], dimension = ARGV[at], count = tonumber(ARGV[at + 1]),
                 seconds = tonumber(ARGV[at + 2])}
    local h, held = head(lim.key, field)
    if held then return redis.error_reply('reservation id already held: ' .. id) end
    lim.h = prune(lim.key, h, lim.seconds, stale, now)
    local used, reserved = lim.h and lim.h.used or 0, lim.h and lim.h.reserved or 0
    lim.remaining = math.max(0, lim.count - used - reserved)
    limits[i] = lim
end

-- limiter.fits_at: the earliest time >= now at which `need` fits, nil if never
local function fits_at(lim, need)
    if need > lim.count then return nil end
    local live = records(lim.key)
    table.sort(live, function(a, b) return a.stamp < b.stamp end)
    local held = 0
    for _, r in ipairs(live) do held = held + r.amount end
    if lim.count - held >= need then return now end
    for _, r in ipairs(live) do
        held = held - r.amount
        if lim.count - held >= need then return r.stamp + lim.seconds end
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
    out = {0, '-', 0, 0, blocking, retry_at and exact(retry_at) or '-'}
    for _, lim in ipairs(limits) do status_reply(out, lim.h, lim.seconds, now) end
    return table.concat(out, ' ')
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
    if lim.h and lim.h.newest > stamp then stamp = lim.h.newest end
end
out = {1, exact(stamp), exact(prompt), exact(completion), 0, '-'}
for _, lim in ipairs(limits) do
    local h = lim.h or {used = 0, reserved = 0, oldest = stamp}
    local amount = amount_of(lim.dimension, prompt, completion)
    h.reserved, h.newest, h.since = h.reserved + amount, stamp, h.since or stamp
    redis.call('HSET', lim.key, field, exact(stamp) .. ' ' .. exact(amount), 'used', h.used,
               'reserved', h.reserved, 'newest', exact(stamp), 'oldest', exact(h.oldest),
               'since', exact(h.since))
    redis.call('EXPIRE', lim.key, math.ceil(lim.seconds + stale))
    status_reply(out, h, lim.seconds, now)
end
return table.concat(out, ' ')
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
local field = 'rid:' .. id
local out = {}
for i = 1, #KEYS do
    local key = KEYS[i]
    local dimension, seconds = ARGV[7 + (i - 1) * 2], tonumber(ARGV[8 + (i - 1) * 2])
    local read, held = head(key, field)
    local h = prune(key, read, seconds, stale, now)
    if h ~= read and held then  -- pruned: the reservation may have left or gone stale since
        held = redis.call('HGET', key, field)
    end
    if h and held and mode ~= 'status' then
        local stamp, amount = pair(held)
        redis.call('HDEL', key, field)
        if mode == 'release' then
            h = rebuild(key)  -- the newest stamp may go back, or the window empty
        else
            local settled = amount_of(dimension, prompt, completion)
            h.used, h.reserved = h.used + settled, h.reserved - amount
            local slot, value = merged(key, seconds, stamp, settled)
            redis.call('HSET', key, slot, value, 'used', h.used, 'reserved', h.reserved)
        end
        if h then redis.call('EXPIRE', key, math.ceil(seconds + stale)) end
    end
    status_reply(out, h, seconds, now)
end
return table.concat(out, ' ')
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
        self._keys: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"RedisStore({self.where!r}, prefix={self.prefix!r})"

    def key_of(self, bucket: Bucket) -> str:
        """The bucket's hash, tagged by its `proxy:scope` (the key up to its last colon)."""
        key = self._keys.get(bucket.key)
        if key is None:
            scope, _, limit = bucket.key.rpartition(":")
            key = self._keys[bucket.key] = f"{self.prefix}:{{{scope or bucket.key}}}:{limit}"
        return key

    def _now(self) -> str:
        return "" if self.clock is None else repr(float(self.clock()))

    async def _call(self, script, buckets: tuple[Bucket, ...], args: list) -> list[str]:
        """The script's reply, split into its words."""
        keys = [self.key_of(bucket) for bucket in buckets]
        try:
            return (await script(keys=keys, args=args)).split(" ")
        except (RedisError, OSError) as e:
            message = f"redis store {self.where}: {type(e).__name__}: {e}"
            # Unless the connection was never made, the script may have run on the server.
            raise StoreUnavailable(message, maybe_applied=not _never_sent(e)) from e

    @staticmethod
    def _statuses(buckets: tuple[Bucket, ...], reply: list[str]) -> tuple[LimitStatus, ...]:
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
        if admitted == "0":
            retry = None if retry_at == "-" else float(retry_at)
            refusing = statuses[int(blocking) - 1]
            return Decision(False, statuses, blocking=refusing, retry_at=retry), None
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
