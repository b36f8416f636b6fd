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
from dataclasses import dataclass, replace

from mitmproxy import http

from . import answers
from .accounting import Accounting
from .config import Proxy
from .dialects import Dialect
from .gate import Gate
from .limiter import (
    BUDGET,
    Bucket,
    Decision,
    Demand,
    LimitStatus,
    Rates,
    Usage,
    held_back_by_reservations,
    settled_view,
)
from .prices import Price, PriceBook, cost
from .stores import Reservation, StoreUnavailable

STORE_RETRY_AFTER = 2  # seconds a caller is asked to wait while the store is down
# A waiting request re-checks this often even without a local settlement (shared stores).
QUEUE_POLL_SECONDS = 0.1
DEFAULT_QUEUE_LIMIT = 100


def buckets_for(proxy: Proxy, key_name: str, model: str | None = None) -> tuple[Bucket, ...]:
    """The windows a request for `model` counts against: every limit whose model filter it
    matches (None: every limit), each in its scope, the caller's own or its proxy's shared."""
    return tuple(
        Bucket(f"{proxy.name}:{key_name if scope == 'key' else '*'}:{limit.window}", limit)
        for limit in proxy.limits
        if limit.applies_to(model)
        for scope in (limit.scope or proxy.scope,)
    )


@dataclass(frozen=True)
class Ask:
    """One request asking to be admitted."""

    id: str  # the flow's id: a reservation is settled once, by this id
    proxy: Proxy
    key: str
    demand: Demand
    dialect: Dialect
    waiting: Callable[[], bool] = lambda: True  # False once the caller hung up
    model: str | None = None  # None: not known yet (the body has not been read)
    completions: int = 1  # how many completions share the completion reserve
    service_tier: str | None = None  # the tier the request asks for: reserved at its price


@dataclass(frozen=True)
class Admission:
    """An admitted request. Unmetered (`reservation` None) while the store is down and the
    proxy fails open. It keeps the dialect it was admitted in: its answer is read in that one,
    even if a reload removes its proxy meanwhile; and its model's price, known or not."""

    reservation: Reservation | None
    decision: Decision | None
    dialect: Dialect
    statuses: tuple[LimitStatus, ...] = ()  # the windows with this reservation held
    price: Price | None = None

    def cost(self, usage: Usage) -> int | None:
        """Micro-dollars `usage` costs at this model's price; None where it is not known."""
        return None if self.price is None else cost(usage, self.price)


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

    async def price(self, ask: Ask) -> Price | None:
        """The price of the request's model: from `prices:`, or from the bundled table where a
        proxy has a budget (a gate without one never loads the table; with one, a request that
        comes before the table is in waits for it off the event loop)."""
        config = self.gate.config
        if ask.model is None or config is None:
            return None
        book = config.price_book
        if not config.budgeted:
            return book.override(ask.model)
        await PriceBook.loaded()
        return book.price(ask.model, api_url=ask.proxy.provider.base_url, at=self.gate.clock())

    async def admit(self, ask: Ask) -> Admission | Refusal | None:
        """Reserve across every limit that applies to the request. None: none applies."""
        buckets = buckets_for(ask.proxy, ask.key, ask.model)
        if not buckets:
            return None
        price = await self.price(ask)
        demand = replace(ask.demand, least=ask.completions if ask.proxy.strict else 0)
        if any(bucket.limit.dimension == BUDGET for bucket in buckets):
            if price is None:
                return Refusal(answers.unpriced(ask.dialect, ask.proxy.name, ask.model), None)
            rates = price.under(ask.service_tier).at(demand.prompt)
            demand = replace(demand, rates=Rates(rates.input, rates.output))
        ask = replace(ask, demand=demand)
        try:
            decision, reservation = await self.accounting.reserve(ask.id, buckets, demand)
            if reservation is None and ask.proxy.queue_wait:
                decision, reservation = await self._queue(ask, buckets, decision)
        except StoreUnavailable:
            if ask.proxy.fail == "open":
                return Admission(None, None, ask.dialect, price=price)
            return Refusal(answers.store_unavailable(ask.dialect, STORE_RETRY_AFTER), None)
        if reservation is None:
            now = self.gate.clock()
            answer = answers.rate_limited(ask.dialect, decision, now, ask.proxy, demand)
            return Refusal(answer, decision)
        admission = Admission(reservation, decision, ask.dialect, decision.statuses, price)
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
        if usage is not None:
            usage = replace(usage, cost=admission.cost(usage) or 0)
        self.gate.writes.hand_over(lambda: self.accounting.settle(reservation, usage))
        return settled_view(admission.statuses, reservation.amounts, usage or Usage(0, 0))

    async def standing(self, proxy: Proxy, key: str) -> tuple[LimitStatus, ...]:
        """Every window of the caller, each limit in its scope, as they stand (the
        settlements already handed over included)."""
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
