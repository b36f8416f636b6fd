"""The gate's calls to its store, kept whole through a store outage and a change of store.

An outage is logged once when it starts and once when it ends. A settlement or release that
cannot be written is kept (bounded) and written before the next calls once the store answers
again, so the books end exact and the first decisions after an outage see them; if the process
stops first, the store itself charges the held reservation at its reserved amount after
`reservation_timeout`, never less. Each reservation is settled in the store that holds it, so a
reload that switches stores does not lose the requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable

from .gate import Gate
from .limiter import Bucket, Decision, Demand, LimitStatus, Usage
from .stores import Reservation, Store, StoreUnavailable

log = logging.getLogger("tokengate")

MAX_UNWRITTEN = 100_000  # settlements kept while the store is down (then: the store's timeout)
WRITES_PER_CALL = 64  # kept settlements written ahead of one call, so no caller waits long


class Accounting:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.down_since: float | None = None  # monotonic time the current outage began
        self._held: dict[str, Store] = {}  # reservation id -> the store holding it
        self._unwritten: deque[tuple[Store, Reservation, Usage | None]] = deque()
        self._dropped = 0  # settlements not kept because the queue was full
        self._settled = asyncio.Event()  # set (and replaced) whenever a reservation ends here

    async def settlement(self, timeout: float) -> None:
        """Wait until this gate settles or releases a reservation, or `timeout` passes."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), timeout)

    async def reserve(
        self, reservation_id: str, buckets: tuple[Bucket, ...], demand: Demand
    ) -> tuple[Decision, Reservation | None]:
        """The store's decision; raises StoreUnavailable (after logging) when it has none."""
        await self.gate.writes.caught_up()  # decide on the settlements handed over before
        store = self.gate.store
        try:
            await self._write_kept()
            decision, reservation = await self._timed(
                "reserve", store.reserve(reservation_id, buckets, demand)
            )
        except StoreUnavailable as e:
            self._failed(e)
            if e.maybe_applied:
                # The call may still run on a stalled server once it wakes (Redis): release
                # whatever it held when the store is back (a release needs only id and buckets).
                self._keep(store, Reservation(reservation_id, 0.0, buckets, Usage(0, 0)), None)
            raise
        self._recovered()
        if reservation is not None:
            self._held[reservation_id] = store
        return decision, reservation

    async def settle(
        self, reservation: Reservation, usage: Usage | None
    ) -> tuple[LimitStatus, ...] | None:
        """Charge `usage` (None: release); None when the store is down and the write waits."""
        store = self._held.pop(reservation.id, self.gate.store)
        try:
            await self._write_kept()
            statuses = await self._write(store, reservation, usage)
        except StoreUnavailable as e:
            self._failed(e)
            self._keep(store, reservation, usage)
            return None
        self._recovered()
        self._wake()
        return statuses

    async def _write(self, store: Store, reservation: Reservation, usage: Usage | None):
        if usage is None:
            return await self._timed("release", store.release(reservation))
        return await self._timed("settle", store.settle(reservation, usage))

    async def _timed[T](self, operation: str, call: Awaitable[T]) -> T:
        """One store call, its time and whether the store answered told to the gate's probes."""
        began = time.perf_counter()
        answered = False
        try:
            result = await call
            answered = True
            return result
        finally:
            self.gate.probes.store_call(operation, time.perf_counter() - began, answered)

    def _keep(self, store: Store, reservation: Reservation, usage: Usage | None) -> None:
        if len(self._unwritten) < MAX_UNWRITTEN:
            self._unwritten.append((store, reservation, usage))
        else:
            self._dropped += 1

    async def _write_kept(self) -> None:
        """Write up to WRITES_PER_CALL kept settlements, oldest first; raises while still down."""
        written = 0
        while self._unwritten and written < WRITES_PER_CALL:
            # Taken before the write, so a call running meanwhile takes the next one.
            kept = self._unwritten.popleft()
            try:
                await self._write(*kept)
            except BaseException:
                self._unwritten.appendleft(kept)
                raise
            written += 1
        if written:
            self._wake()

    def _wake(self) -> None:
        """Budget may have come free: wake the requests waiting for it."""
        self._settled.set()
        self._settled = asyncio.Event()

    def _failed(self, error: StoreUnavailable) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("tokengate: usage store unavailable: %s", error)

    def _recovered(self) -> None:
        if self.down_since is None:
            return
        log.warning(
            "tokengate: usage store is back after %.1f s; full accounting resumed "
            "(%d settlements kept meanwhile still to write; %d not kept, charged at their "
            "reservation by the store's reservation_timeout)",
            time.monotonic() - self.down_since,
            len(self._unwritten),
            self._dropped,
        )
        self.down_since = None
        self._dropped = 0
