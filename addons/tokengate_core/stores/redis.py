"""Charges in Redis, shared by several mitmdump instances.

Each request is one Lua script (lua/reserve.lua, or lua/settle.lua, each run after the window
rules they share in lua/window.lua), so it is atomic across all the limits of the request, and
decided on the Redis server's clock (`TIME`): instances whose clocks disagree still agree on the
windows. The scripts apply the rules of `limiter.decide_on` (each window's `Terms`, computed
here in Python: its minimum, the completion capped by what every window has left, money
included; debt kept; `fits_at` for the retry time) and of `window.Window`; a settle is sent each
window's own charge (`limiter.charged`). The conformance suite (tests/unit/test_stores.py) holds
them to the memory store's decisions.

Per bucket, one hash (`tokengate:{proxy}:alice:total_tokens#0`): its head (`used`, `reserved`,
`newest` stamp, lower bounds `oldest` and `since` on the oldest stamp and the oldest pending
one), its settled charges merged into slots (`slot:<duration>:<slot>` -> "stamp amount", as
`limiter.slot_of` and `limiter.merged` say) and its reservations in flight (`rid:<id>` -> "stamp
amount"). A call reads the heads; the other fields are read only when the lower bounds say
something may have left the window or gone stale, and by a refused request. The key is
hash-tagged with the bucket's proxy: all the buckets of one request, its key's and its team's,
live in one hash slot, and a script touches only the keys it is given, so the scripts run
unchanged on Redis Cluster (`cluster=True`: redis-py's cluster client, which sends each call to
the master of its slot). Every key gets a TTL of its window plus `stale_after`, refreshed on
each write, and is deleted when its window empties.

Learned estimates (`estimates.py`) live in one more hash (`tokengate:{learned}`), one field per
(provider, model), updated by compare-and-set (lua/learn.lua) so the rule stays in Python; it
keeps LEARNED_TTL after its last update.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from importlib.resources import files
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AskError, ClusterDownError, RedisClusterException, TryAgainError

from ..limiter import (
    SLOTS,
    Bucket,
    Decision,
    Demand,
    LimitStatus,
    Usage,
    charged,
    held_for,
    terms_of,
)
from . import STALE_AFTER, Reservation, StoreUnavailable

TIMEOUT = 1.0  # seconds for connecting and for each reply: a store that is down answers fast
LEARNED_TTL = 30 * 86400  # seconds the learned estimates outlive their last update
LEARN_ATTEMPTS = 5  # compare-and-set rounds before an update waits for the next sync

LUA = files(__package__) / "lua"
SHARED = "window.lua"  # the window rules, run ahead of each script's own file


def script(name: str) -> str:
    """A script's text: the shared window rules, then its own file (a script is one chunk)."""
    return (LUA / SHARED).read_text("utf-8") + (LUA / f"{name}.lua").read_text("utf-8")


# Read once, when the module is imported; each store registers them once with its client.
RESERVE = script("reserve")
SETTLE = script("settle")
LEARN = (LUA / "learn.lua").read_text("utf-8")


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
    a clock given here (tests with a fake clock) is sent with every call instead.

    `cluster`: `url` is one node of a Redis Cluster (its password and TLS serve every node) and
    `cluster_nodes` (host, port) more seeds; the client learns the slots' masters from any seed
    that answers, and again after a call fails."""

    def __init__(
        self,
        url: str,
        clock: Callable[[], float] | None = None,
        stale_after: float = STALE_AFTER,
        prefix: str = "tokengate",
        timeout: float = TIMEOUT,
        cluster: bool = False,
        cluster_nodes: tuple[tuple[str, int], ...] = (),
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the key prefix may not contain braces (they make the hash tag)")
        self.where = redacted(url) + (" (cluster)" if cluster else "")
        self.clock = clock
        self.stale_after = stale_after
        self.prefix = prefix
        # No retries: a reserve sent twice would hold twice, and a store that is down should
        # say so at once; a pooled connection the server closed is replaced when taken. The
        # cluster client still follows MOVED and ASK (the node that answers them ran nothing).
        options = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            "decode_responses": True,
        }
        if cluster:
            seeds = [ClusterNode(host, port) for host, port in cluster_nodes]
            self.redis = RedisCluster.from_url(url, startup_nodes=seeds or None, **options)
        else:
            self.redis = redis.asyncio.from_url(url, **options)
        self._reserve = self.redis.register_script(RESERVE)
        self._settle = self.redis.register_script(SETTLE)
        self._learn = self.redis.register_script(LEARN)
        self.learned_key = f"{prefix}:{{learned}}"
        self._keys: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"RedisStore({self.where!r}, prefix={self.prefix!r})"

    def key_of(self, bucket: Bucket) -> str:
        """The bucket's hash, tagged by its proxy (the key up to its first colon): one request's
        windows, its key's and its team's, are in one cluster slot, as one script needs."""
        key = self._keys.get(bucket.key)
        if key is None:
            proxy, _, rest = bucket.key.partition(":")
            key = self._keys[bucket.key] = f"{self.prefix}:{{{proxy}}}:{rest or proxy}"
        return key

    def _shared(self) -> tuple:
        """The ARGV every script starts with (window.lua): now ('' = the server's clock),
        stale_after, SLOTS."""
        now = "" if self.clock is None else repr(float(self.clock()))
        return now, self.stale_after, SLOTS

    async def _call(self, script, buckets: tuple[Bucket, ...], args: list) -> list[str]:
        """The script's reply, split into its words."""
        keys = [self.key_of(bucket) for bucket in buckets]
        reply = await self._guarded(lambda: script(keys=keys, args=args))
        return reply.split(" ")

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
        args = [*self._shared(), reservation_id, demand.completion]
        for bucket in buckets:
            terms = terms_of(bucket.limit, demand)
            args += [bucket.limit.count, bucket.limit.seconds, terms.base, terms.rate]
            args.append(terms.minimum)
        reply = await self._call(self._reserve, buckets, args)
        admitted, stamp, completion, blocking, retry_at = reply[:5]
        statuses = self._statuses(buckets, reply[5:])
        if admitted == "0":
            retry = None if retry_at == "-" else float(retry_at)
            refusing = statuses[int(blocking) - 1]
            return Decision(False, statuses, blocking=refusing, retry_at=retry), None
        amounts = held_for(demand, int(completion))
        decision = Decision(True, statuses, reserved=amounts)
        return decision, Reservation(reservation_id, float(stamp), buckets, amounts)

    async def _replace(
        self, mode: str, buckets: tuple[Bucket, ...], reservation_id: str, usage: Usage
    ) -> tuple[LimitStatus, ...]:
        args = [*self._shared(), reservation_id, mode]
        for bucket in buckets:
            args += [charged(bucket.limit, usage), bucket.limit.seconds]
        return self._statuses(buckets, await self._call(self._settle, buckets, args))

    async def settle(self, reservation: Reservation, usage: Usage) -> tuple[LimitStatus, ...]:
        return await self._replace("settle", reservation.buckets, reservation.id, usage)

    async def release(self, reservation: Reservation) -> tuple[LimitStatus, ...]:
        return await self._replace("release", reservation.buckets, reservation.id, Usage(0, 0))

    async def status(self, buckets: tuple[Bucket, ...]) -> tuple[LimitStatus, ...]:
        return await self._replace("status", buckets, "", Usage(0, 0))

    async def learned(self) -> dict[str, str]:
        return await self._guarded(lambda: self.redis.hgetall(self.learned_key))

    async def learn(self, updates: Mapping[str, Callable[[str | None], str]]) -> dict[str, str]:
        fields = list(updates)
        for _ in range(LEARN_ATTEMPTS):
            stored = await self._guarded(partial(self.redis.hmget, self.learned_key, fields))
            args: list = [LEARNED_TTL]
            for field, old in zip(fields, stored, strict=True):
                args += [field, old or "", updates[field](old)]
            reply = await self._guarded(partial(self._learn, keys=[self.learned_key], args=args))
            if reply is not None:
                return dict(zip(reply[0::2], reply[1::2], strict=True))
        raise StoreUnavailable(f"redis store {self.where}: learned estimates kept changing")

    async def _guarded(self, command: Callable[[], Awaitable]):
        """The reply of `command()`; StoreUnavailable when it failed in any way."""
        try:
            if isinstance(self.redis, RedisCluster):
                # The slots' masters first (a no-op once known): until it knows them the client
                # sends a call to any node, and many MOVED replies at once make it reset every
                # connection, those of the calls still in flight too.
                await self.redis.initialize()
            return await command()
        except Exception as e:
            # Not only RedisError: the cluster client raises RedisClusterException, and when it
            # resets its connections (CLUSTERDOWN) a call still sending on one fails with
            # whatever asyncio's closed transport raises (TypeError). A call that failed in any
            # way is a store that cannot be used, never a request let through unmetered.
            message = f"redis store {self.where}: {type(e).__name__}: {e}"
            # Unless the connection was never made, the command may have run on the server.
            raise StoreUnavailable(message, maybe_applied=not _never_sent(e)) from e

    async def close(self) -> None:
        """Close the connection pool; call once at shutdown."""
        await self.redis.aclose()


def _never_sent(error: Exception) -> bool:
    """True when no script ran: the connection itself failed, or the cluster refused the call.

    redis-py words every failed connect as "... connecting to ..." ("Error 111 connecting to
    127.0.0.1:6379. Connection refused.", "Timeout connecting to server"). A cluster refuses
    before running anything while it is down or its slot is moving (CLUSTERDOWN, MOVED/ASK past
    the client's redirections, TRYAGAIN), and the client raises RedisClusterException when it
    finds no node to send to.
    """
    refused = (ClusterDownError, AskError, TryAgainError, RedisClusterException)
    return isinstance(error, refused) or "connecting to" in str(error)
