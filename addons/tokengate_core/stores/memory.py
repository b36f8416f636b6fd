"""Charges in process memory: for tests and throwaway runs (a restart forgets everything)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from ..limiter import Bucket, Charge, Decision, Demand, LimitStatus, Usage, decide, live, status_of
from . import Reservation

Clock = Callable[[], float]


class MemoryStore:
    """Windows as lists of charges keyed by bucket; idle buckets are dropped as they empty."""

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        self._windows: dict[str, dict[str, Charge]] = {}

    def _charges(self, bucket: Bucket, now: float) -> dict[str, Charge]:
        """The bucket's live charges by reservation id, pruning the expired ones."""
        charges = self._windows.get(bucket.key, {})
        expired = [rid for rid, c in charges.items() if c.stamp + bucket.limit.seconds <= now]
        for rid in expired:
            del charges[rid]
        return charges

    async def reserve(
        self, reservation_id: str, buckets: tuple[Bucket, ...], demand: Demand
    ) -> tuple[Decision, Reservation | None]:
        now = self.clock()
        windows = [(b, list(self._charges(b, now).values())) for b in buckets]
        decision = decide(windows, demand, now)
        if not decision.admitted:
            return decision, None
        amounts = decision.reserved
        for bucket in buckets:
            charge = Charge(now, amounts.amount(bucket.limit.dimension), settled=False)
            self._windows.setdefault(bucket.key, {})[reservation_id] = charge
        # Report the windows as they stand with this reservation held.
        decision = replace(decision, statuses=self._statuses(buckets, now))
        return decision, Reservation(reservation_id, now, buckets, amounts)

    def _replace(self, reservation: Reservation, usage: Usage | None) -> tuple[LimitStatus, ...]:
        now = self.clock()
        for bucket in reservation.buckets:
            charges = self._charges(bucket, now)
            held = charges.get(reservation.id)
            if held is not None and not held.settled:
                if usage is None:
                    del charges[reservation.id]
                else:
                    amount = usage.amount(bucket.limit.dimension)
                    charges[reservation.id] = Charge(held.stamp, amount, settled=True)
            if not charges:
                self._windows.pop(bucket.key, None)
        return self._statuses(reservation.buckets, now)

    async def settle(self, reservation: Reservation, usage: Usage) -> tuple[LimitStatus, ...]:
        return self._replace(reservation, usage)

    async def release(self, reservation: Reservation) -> tuple[LimitStatus, ...]:
        return self._replace(reservation, None)

    def _statuses(self, buckets: tuple[Bucket, ...], now: float) -> tuple[LimitStatus, ...]:
        return tuple(
            status_of(
                b.limit, live(self._windows.get(b.key, {}).values(), b.limit.seconds, now), now
            )
            for b in buckets
        )

    async def status(self, buckets: tuple[Bucket, ...]) -> tuple[LimitStatus, ...]:
        return self._statuses(buckets, self.clock())

    async def close(self) -> None:
        self._windows.clear()
