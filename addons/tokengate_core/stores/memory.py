"""Charges in process memory: for tests and throwaway runs (a restart forgets everything)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from ..config import Limit
from ..limiter import (
    Bucket,
    Charge,
    Decision,
    Demand,
    LimitStatus,
    Usage,
    decide_on,
    merged,
    slot_of,
)
from . import STALE_AFTER, Reservation

Clock = Callable[[], float]


class Window:
    """One bucket's charges: settled ones merged into slots (`limiter.slot_of`), reservations in
    flight one by one, with running totals so a check is O(1).

    `pending` keeps insertion order, which is stamp order because stamps never go backwards in
    a window (a clock that does is clamped to the newest stamp), so stale ones are found from the
    front; it is None while nothing is in flight (most windows of idle keys), to save the empty
    dict. `oldest` is never later than any stamp held: until it leaves the window nothing does,
    so most checks skip pruning. Slots are keyed by (duration, slot): after a duration edit the
    old slots keep their own width and leave the window by their stamp and the new duration.
    """

    __slots__ = ("newest", "oldest", "pending", "reserved", "slots", "used")

    def __init__(self, stamp: float) -> None:
        self.slots: dict[tuple[int, int], Charge] = {}
        self.pending: dict[str, Charge] | None = None
        self.used = 0
        self.reserved = 0
        self.newest = self.oldest = stamp

    def prune(self, seconds: int, now: float, stale_after: float) -> bool:
        """Drop what left the window; count reservations older than `stale_after` as settled.
        False when nothing is left."""
        if self.oldest + seconds <= now:
            kept = {key: slot for key, slot in self.slots.items() if slot.stamp + seconds > now}
            if len(kept) != len(self.slots):
                self.slots = kept
                self.used = sum(slot.amount for slot in kept.values())
            while self.pending:
                reservation_id, oldest = next(iter(self.pending.items()))
                if oldest.stamp + seconds > now:
                    break
                del self.pending[reservation_id]
                self.reserved -= oldest.amount
            self.pending = self.pending or None
            if not self.slots and not self.pending:
                return False
            self.oldest = min(charge.stamp for charge in self.charges())
        while self.pending:
            reservation_id, oldest = next(iter(self.pending.items()))
            if oldest.stamp + stale_after > now:
                break
            self.settle(reservation_id, oldest.amount, seconds)
        return True

    def hold(self, reservation_id: str, charge: Charge) -> None:
        if self.pending is None:
            self.pending = {}
        self.pending[reservation_id] = charge
        self.reserved += charge.amount
        self.newest = charge.stamp  # stamps never go backwards in a window

    def settle(self, reservation_id: str, amount: int | None, seconds: int) -> None:
        """Merge a pending charge into its slot at `amount`, or drop it when `amount` is None."""
        held = self.pending.pop(reservation_id, None) if self.pending else None
        if held is None:
            return
        self.pending = self.pending or None
        self.reserved -= held.amount
        if amount is not None:
            key = (seconds, slot_of(held.stamp, seconds))
            self.slots[key] = merged(self.slots.get(key), held.stamp, amount)
            self.used += amount
        elif held.stamp == self.newest and not self.empty:
            self.newest = max(charge.stamp for charge in self.charges())

    @property
    def empty(self) -> bool:
        return not self.slots and not self.pending

    def charges(self) -> list[Charge]:
        return [*self.slots.values(), *(self.pending or {}).values()]

    def status(self, limit: Limit) -> LimitStatus:
        return LimitStatus(limit, self.used, self.reserved, self.newest + limit.seconds)


class MemoryStore:
    """Windows keyed by bucket; a window that empties is dropped, so idle keys cost nothing.

    A reservation still unsettled `stale_after` seconds after its stamp counts as settled at its
    reserved amount (a late settle changes nothing), as in the SQLite and Redis stores, where
    that is how a crashed process's reservations end; here it bounds a settle that never comes.
    """

    def __init__(self, clock: Clock = time.time, stale_after: float = STALE_AFTER) -> None:
        self.clock = clock
        self.stale_after = stale_after
        self._windows: dict[str, Window] = {}

    def _window(self, bucket: Bucket, now: float) -> Window | None:
        """The bucket's window, pruned to `now`; None when it holds nothing."""
        window = self._windows.get(bucket.key)
        if window is not None and not window.prune(bucket.limit.seconds, now, self.stale_after):
            del self._windows[bucket.key]
            return None
        return window

    @staticmethod
    def _status(window: Window | None, limit: Limit, now: float) -> LimitStatus:
        return LimitStatus(limit, 0, 0, now) if window is None else window.status(limit)

    def _statuses(self, buckets: tuple[Bucket, ...], now: float) -> tuple[LimitStatus, ...]:
        return tuple(self._status(self._window(b, now), b.limit, now) for b in buckets)

    async def reserve(
        self, reservation_id: str, buckets: tuple[Bucket, ...], demand: Demand
    ) -> tuple[Decision, Reservation | None]:
        now = self.clock()
        windows = [self._window(b, now) for b in buckets]
        statuses = [self._status(w, b.limit, now) for w, b in zip(windows, buckets, strict=True)]
        decision = decide_on(
            statuses, lambda i: windows[i].charges() if windows[i] else [], demand, now
        )
        if not decision.admitted:
            return decision, None
        stamp = max([now, *(w.newest for w in windows if w is not None)])
        amounts = decision.reserved
        for window, bucket in zip(windows, buckets, strict=True):
            if window is None:
                window = self._windows[bucket.key] = Window(stamp)
            window.hold(
                reservation_id, Charge(stamp, amounts.amount(bucket.limit.dimension), False)
            )
        # Report the windows as they stand with this reservation held.
        statuses = tuple(self._windows[b.key].status(b.limit) for b in buckets)
        decision = replace(decision, statuses=statuses)
        return decision, Reservation(reservation_id, stamp, buckets, amounts)

    def _replace(self, reservation: Reservation, usage: Usage | None) -> tuple[LimitStatus, ...]:
        now = self.clock()
        for bucket in reservation.buckets:
            window = self._window(bucket, now)
            if window is None:
                continue
            amount = None if usage is None else usage.amount(bucket.limit.dimension)
            window.settle(reservation.id, amount, bucket.limit.seconds)
            if window.empty:
                del self._windows[bucket.key]
        return self._statuses(reservation.buckets, now)

    async def settle(self, reservation: Reservation, usage: Usage) -> tuple[LimitStatus, ...]:
        return self._replace(reservation, usage)

    async def release(self, reservation: Reservation) -> tuple[LimitStatus, ...]:
        return self._replace(reservation, None)

    async def status(self, buckets: tuple[Bucket, ...]) -> tuple[LimitStatus, ...]:
        return self._statuses(buckets, self.clock())

    async def close(self) -> None:
        self._windows.clear()
