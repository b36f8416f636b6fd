"""The gate's calls to its store, kept whole through a store outage.

An outage is logged once when it starts and once when it ends. A settlement or release that
cannot be written is kept (bounded) and written on the first successful call after the store
is back, so the books still end exact; if the process stops first, the store itself charges
the held reservation at its reserved amount after `reservation_timeout`, never less.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

from .limiter import Bucket, Decision, Demand, LimitStatus, Usage
from .settings import Gate
from .stores import Reservation, StoreUnavailable

log = logging.getLogger("tokengate")

MAX_UNWRITTEN = 100_000  # settlements kept while the store is down; older ones fall to the store


class Accounting:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.down_since: float | None = None  # monotonic time the current outage began
        self._unwritten: deque[tuple[Reservation, Usage | None]] = deque(maxlen=MAX_UNWRITTEN)
        self._settled = asyncio.Event()  # set (and replaced) whenever a reservation ends here

    async def settlement(self, timeout: float) -> None:
        """Wait until this gate settles or releases a reservation, or `timeout` passes."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), timeout)

    @property
    def degraded(self) -> bool:
        return self.down_since is not None

    async def reserve(
        self, reservation_id: str, buckets: tuple[Bucket, ...], demand: Demand
    ) -> tuple[Decision, Reservation | None]:
        """The store's decision; raises StoreUnavailable (after logging) when it has none."""
        try:
            result = await self.gate.store.reserve(reservation_id, buckets, demand)
        except StoreUnavailable as e:
            self._failed(e)
            # A reserve that timed out may still run once a stalled server wakes (Redis): its
            # hold is released when the store is back. Where nothing was held this changes
            # nothing (a release needs only the id and the buckets).
            self._unwritten.append((Reservation(reservation_id, 0.0, buckets, Usage(0, 0)), None))
            raise
        await self._recovered()
        return result

    async def settle(
        self, reservation: Reservation, usage: Usage | None
    ) -> tuple[LimitStatus, ...] | None:
        """Charge `usage` (None: release); None when the store is down and the write waits."""
        try:
            statuses = await self._write(reservation, usage)
        except StoreUnavailable as e:
            self._failed(e)
            self._unwritten.append((reservation, usage))
            return None
        # Budget may have come free: wake the requests waiting for it.
        self._settled.set()
        self._settled = asyncio.Event()
        await self._recovered()
        return statuses

    async def _write(self, reservation: Reservation, usage: Usage | None):
        if usage is None:
            return await self.gate.store.release(reservation)
        return await self.gate.store.settle(reservation, usage)

    def _failed(self, error: StoreUnavailable) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("tokengate: usage store unavailable: %s", error)

    async def _recovered(self) -> None:
        if self.down_since is None:
            return
        log.warning(
            "tokengate: usage store is back after %.1f s; full accounting resumed "
            "(writing %d settlements kept meanwhile)",
            time.monotonic() - self.down_since,
            len(self._unwritten),
        )
        self.down_since = None
        while self._unwritten:
            reservation, usage = self._unwritten.popleft()
            try:
                await self._write(reservation, usage)
            except StoreUnavailable as e:
                self._unwritten.appendleft((reservation, usage))
                self._failed(e)
                return
