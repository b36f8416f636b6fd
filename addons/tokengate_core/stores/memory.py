"""Charges in process memory: for tests and throwaway runs (a restart forgets everything)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from ..config import Limit
from ..limiter import Bucket, Charge, Decision, Demand, LimitStatus, Usage, decide_on
from . import STALE_AFTER, Reservation

Clock = Callable[[], float]


class Window:
    """One bucket's live charges in stamp order, with running totals so a check is O(1).

    Charges are keyed by reservation id; a dict keeps insertion order, which is stamp order
    because stamps never go backwards (a clock that does is clamped to the last stamp).
    `pending` holds the unsettled ones in the same order, so stale ones are found from the front.
    """

    __slots__ = ("charges", "pending", "reserved", "used")

    def __init__(self) -> None:
        self.charges: dict[str, Charge] = {}
        self.pending: dict[str, Charge] = {}
        self.used = 0
        self.reserved = 0

    @property
    def last_stamp(self) -> float:
        return next(reversed(self.charges.values())).stamp if self.charges else float("-inf")

    def prune(self, seconds: int, now: float, stale_after: float) -> None:
        """Drop expired charges; count reservations older than `stale_after` as settled."""
        while self.charges:
            oldest_id = next(iter(self.charges))
            oldest = self.charges[oldest_id]
            if oldest.stamp + seconds > now:
                break
            del self.charges[oldest_id]
            self.pending.pop(oldest_id, None)
            self._count(oldest, -1)
        while self.pending:
            oldest_id = next(iter(self.pending))
            if self.pending[oldest_id].stamp + stale_after > now:
                break
            self._replace(oldest_id, self.pending.pop(oldest_id).amount)

    def _count(self, charge: Charge, sign: int) -> None:
        if charge.settled:
            self.used += sign * charge.amount
        else:
            self.reserved += sign * charge.amount

    def hold(self, reservation_id: str, charge: Charge) -> None:
        self.charges[reservation_id] = self.pending[reservation_id] = charge
        self._count(charge, +1)

    def settle(self, reservation_id: str, amount: int | None) -> None:
        """Replace an unsettled charge by `amount`, or drop it when `amount` is None."""
        if self.pending.pop(reservation_id, None) is not None:
            self._replace(reservation_id, amount)

    def _replace(self, reservation_id: str, amount: int | None) -> None:
        held = self.charges[reservation_id]
        self._count(held, -1)
        if amount is None:
            del self.charges[reservation_id]
        else:
            settled = Charge(held.stamp, amount, settled=True)
            self.charges[reservation_id] = settled
            self._count(settled, +1)

    def status(self, limit: Limit, now: float) -> LimitStatus:
        reset_at = self.last_stamp + limit.seconds if self.charges else now
        return LimitStatus(limit, self.used, self.reserved, reset_at)


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

    def _window(self, bucket: Bucket, now: float) -> Window:
        window = self._windows.get(bucket.key)
        if window is None:
            window = self._windows[bucket.key] = Window()
        window.prune(bucket.limit.seconds, now, self.stale_after)
        return window

    def _statuses(self, buckets: tuple[Bucket, ...], now: float) -> tuple[LimitStatus, ...]:
        statuses = tuple(self._window(b, now).status(b.limit, now) for b in buckets)
        for bucket in buckets:
            if not self._windows[bucket.key].charges:
                del self._windows[bucket.key]
        return statuses

    async def reserve(
        self, reservation_id: str, buckets: tuple[Bucket, ...], demand: Demand
    ) -> tuple[Decision, Reservation | None]:
        now = self.clock()
        windows = [self._window(b, now) for b in buckets]
        stamp = max([now, *(w.last_stamp for w in windows)])
        statuses = [w.status(b.limit, now) for w, b in zip(windows, buckets, strict=True)]
        decision = decide_on(statuses, lambda i: list(windows[i].charges.values()), demand, now)
        if not decision.admitted:
            self._statuses(buckets, now)  # drops the windows this look created
            return decision, None
        amounts = decision.reserved
        for window, bucket in zip(windows, buckets, strict=True):
            window.hold(
                reservation_id, Charge(stamp, amounts.amount(bucket.limit.dimension), False)
            )
        # Report the windows as they stand with this reservation held.
        decision = replace(decision, statuses=self._statuses(buckets, now))
        return decision, Reservation(reservation_id, stamp, buckets, amounts)

    def _replace(self, reservation: Reservation, usage: Usage | None) -> tuple[LimitStatus, ...]:
        now = self.clock()
        for bucket in reservation.buckets:
            amount = None if usage is None else usage.amount(bucket.limit.dimension)
            self._window(bucket, now).settle(reservation.id, amount)
        return self._statuses(reservation.buckets, now)

    async def settle(self, reservation: Reservation, usage: Usage) -> tuple[LimitStatus, ...]:
        return self._replace(reservation, usage)

    async def release(self, reservation: Reservation) -> tuple[LimitStatus, ...]:
        return self._replace(reservation, None)

    async def status(self, buckets: tuple[Bucket, ...]) -> tuple[LimitStatus, ...]:
        return self._statuses(buckets, self.clock())

    async def close(self) -> None:
        self._windows.clear()
