"""Charges in process memory: for tests and throwaway runs (a restart forgets everything)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from ..limiter import Bucket, Decision, Demand, LimitStatus, Usage, charged
from . import STALE_AFTER, Reservation
from .window import Window, admit, statuses

Clock = Callable[[], float]


class MemoryStore:
    """A `Window` per bucket; a window that empties is dropped, so idle keys cost nothing.

    A reservation still unsettled `stale_after` seconds after its stamp counts as settled at its
    reserved amount (a late settle changes nothing), as in the SQLite and Redis stores, where
    that is how a crashed process's reservations end; here it bounds a settle that never comes.
    """

    def __init__(self, clock: Clock = time.time, stale_after: float = STALE_AFTER) -> None:
        self.clock = clock
        self.stale_after = stale_after
        self._windows: dict[str, Window] = {}
        self._learned: dict[str, str] = {}  # learned estimate records, by key

    def _window(self, bucket: Bucket, now: float) -> Window | None:
        """The bucket's window, pruned to `now`; None when it holds nothing."""
        window = self._windows.get(bucket.key)
        seconds = bucket.limit.seconds
        if (
            window is not None
            and window.due(seconds, now, self.stale_after)
            and not window.prune(seconds, now, self.stale_after)
        ):
            del self._windows[bucket.key]
            return None
        return window

    async def reserve(
        self, reservation_id: str, buckets: tuple[Bucket, ...], demand: Demand
    ) -> tuple[Decision, Reservation | None]:
        now = self.clock()
        windows = [self._window(b, now) for b in buckets]
        decision, reservation = admit(
            reservation_id, buckets, windows, demand, now, lambda i: windows[i].charges()
        )
        if reservation is not None:
            for bucket, window in zip(buckets, windows, strict=True):
                self._windows[bucket.key] = window
        return decision, reservation

    def _replace(self, reservation: Reservation, usage: Usage | None) -> tuple[LimitStatus, ...]:
        now = self.clock()
        windows = []
        for bucket in reservation.buckets:
            window = self._window(bucket, now)
            if window is not None:
                amount = None if usage is None else charged(bucket.limit, usage)
                window.settle(reservation.id, amount, bucket.limit.seconds)
                if window.empty:
                    del self._windows[bucket.key]
                    window = None
            windows.append(window)
        return statuses(reservation.buckets, windows, now)

    async def settle(self, reservation: Reservation, usage: Usage) -> tuple[LimitStatus, ...]:
        return self._replace(reservation, usage)

    async def release(self, reservation: Reservation) -> tuple[LimitStatus, ...]:
        return self._replace(reservation, None)

    async def status(self, buckets: tuple[Bucket, ...]) -> tuple[LimitStatus, ...]:
        now = self.clock()
        return statuses(buckets, [self._window(b, now) for b in buckets], now)

    async def learned(self) -> dict[str, str]:
        return dict(self._learned)

    async def learn(self, updates: Mapping[str, Callable[[str | None], str]]) -> dict[str, str]:
        for key, update in updates.items():
            self._learned[key] = update(self._learned.get(key))
        return dict(self._learned)

    async def close(self) -> None:
        self._windows.clear()
