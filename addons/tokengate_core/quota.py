"""The quota service: the one place that admits a request against its limits, and settles it.

`admit` reserves, in one atomic store call, the request's demand in every window of the caller's
scope and returns an `Admission`, or a `Refusal` that carries the ready answer (429, or 503 while
the store is down and the proxy fails closed). `settle` replaces the reservation by the real
usage (None: release) once, whatever calls it again. Behind it: waiting for in-flight
reservations (`queue_wait`), store outages and write-behind (`accounting`), the pure rules
(`limiter`) and the store.

Live traffic and QA replay use this same service; replay gives it its own clock and store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy import http

from . import answers
from .accounting import Accounting
from .config import Proxy
from .dialects import Dialect
from .gate import Gate
from .limiter import (
    Bucket,
    Decision,
    Demand,
    LimitStatus,
    Usage,
    held_back_by_reservations,
    settled_view,
)
from .stores import Reservation, StoreUnavailable

STORE_RETRY_AFTER = 2  # seconds a caller is asked to wait while the store is down
# A waiting request re-checks this often even without a local settlement (shared stores).
QUEUE_POLL_SECONDS = 0.1
DEFAULT_QUEUE_LIMIT = 100


def buckets_for(proxy: Proxy, key_name: str) -> tuple[Bucket, ...]:
    """The windows a caller's requests count against: its own, or its proxy's shared ones."""
    scope = key_name if proxy.scope == "key" else "*"
    return tuple(Bucket(f"{proxy.name}:{scope}:{limit.window}", limit) for limit in proxy.limits)


@dataclass(frozen=True)
class Ask:
    """One request asking to be admitted."""

    id: str  # the flow's id: a reservation is settled once, by this id
    proxy: Proxy
    key: str
    demand: Demand
    dialect: Dialect
    waiting: Callable[[], bool] = lambda: True  # False once the caller hung up


@dataclass(frozen=True)
class Admission:
    """An admitted request. Unmetered (`reservation` None) while the store is down and the
    proxy fails open. It keeps the dialect it was admitted in: its answer is read in that one,
    even if a reload removes its proxy meanwhile."""

    reservation: Reservation | None
    decision: Decision | None
    dialect: Dialect
    statuses: tuple[LimitStatus, ...] = ()  # the windows with this reservation held


@dataclass(frozen=True)
class Refusal:
    answer: http.Response
    decision: Decision | None  # None: the store could not decide


class QuotaService:
    def __init__(self, gate: Gate, queue_limit: int = DEFAULT_QUEUE_LIMIT) -> None:
        self.gate = gate
        self.accounting = Accounting(gate)
        self.queue_limit = queue_limit  # requests that may wait at once; 0: none
        self.waiting = 0  # requests waiting in the queue now
        self._held: dict[str, Admission] = {}  # flow id -> its admission, until it settles

    async def admit(self, ask: Ask) -> Admission | Refusal | None:
        """Reserve across every limit of the caller's scope. None: the proxy has no limits."""
        buckets = buckets_for(ask.proxy, ask.key)
        if not buckets:
            return None
        try:
            decision, reservation = await self.accounting.reserve(ask.id, buckets, ask.demand)
            if reservation is None and ask.proxy.queue_wait:
                decision, reservation = await self._queue(ask, buckets, decision)
        except StoreUnavailable:
            if ask.proxy.fail == "open":
                return Admission(None, None, ask.dialect)
            return Refusal(answers.store_unavailable(ask.dialect, STORE_RETRY_AFTER), None)
        if reservation is None:
            now = self.gate.clock()
            answer = answers.rate_limited(
                ask.dialect, decision, now, ask.proxy.name, ask.demand.prompt
            )
            return Refusal(answer, decision)
        admission = Admission(reservation, decision, ask.dialect, decision.statuses)
        self._held[ask.id] = admission
        return admission

    @property
    def in_flight(self) -> int:
        """Reservations held by requests not settled yet."""
        return len(self._held)

    def holding(self, flow_id: str) -> Admission | None:
        """The admission a flow holds until it settles."""
        return self._held.get(flow_id)

    def settle(self, flow_id: str, usage: Usage | None) -> tuple[LimitStatus, ...] | None:
        """Charge `usage` (None: release) for the flow's reservation; None if it holds none.

        The store write runs behind the answer; the windows returned are those taken at
        admission with this call's usage applied (other flows' changes since are not in them).
        """
        admission = self._held.pop(flow_id, None)
        if admission is None or admission.reservation is None:
            return None
        reservation = admission.reservation
        self.gate.writes.hand_over(lambda: self.accounting.settle(reservation, usage))
        return settled_view(admission.statuses, reservation.amounts, usage or Usage(0, 0))

    async def standing(self, proxy: Proxy, key: str) -> tuple[LimitStatus, ...]:
        """The caller's windows as they stand, the settlements already handed over included."""
        await self.gate.writes.caught_up()
        return await self.gate.store.status(buckets_for(proxy, key))

    async def _queue(
        self, ask: Ask, buckets: tuple[Bucket, ...], decision: Decision
    ) -> tuple[Decision, Reservation | None]:
        """Retry, up to the proxy's `queue_wait`, while only in-flight reservations refuse."""
        if self.waiting >= self.queue_limit:
            return decision, None
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + ask.proxy.queue_wait
        self.waiting += 1
        admitted = False
        try:
            while held_back_by_reservations(decision, ask.demand) and ask.waiting():
                left = deadline - loop.time()
                if left <= 0:
                    break
                await self.accounting.settlement(min(left, QUEUE_POLL_SECONDS))
                attempt, reservation = await self.accounting.reserve(ask.id, buckets, ask.demand)
                if reservation is None:
                    decision = attempt  # the latest refusal, answered if the wait ends here
                elif ask.waiting():
                    admitted = True
                    return attempt, reservation
                else:
                    await self.accounting.settle(reservation, None)  # gone while admitted
                    break
        finally:
            self.waiting -= 1
            self.gate.probes.queue_wait(loop.time() - began, admitted)
        return decision, None
