"""Where charges live. Every store decides with `limiter.decide`, so decisions are identical."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..config import DEFAULT_RESERVATION_TIMEOUT
from ..limiter import Bucket, Decision, Demand, LimitStatus, Usage

if TYPE_CHECKING:
    from ..config import StoreSpec

# Seconds after which an unsettled reservation counts as settled at its reserved amount: how the
# reservations of a crashed process end (longer than any request should take).
STALE_AFTER = float(DEFAULT_RESERVATION_TIMEOUT)


@dataclass(frozen=True)
class Reservation:
    """An admitted request's hold on its windows, until it settles or is released."""

    id: str
    stamp: float
    buckets: tuple[Bucket, ...]
    amounts: Usage


class StoreUnavailable(RuntimeError):
    """The store cannot be reached; the proxy's `fail` policy decides what callers get.

    `maybe_applied`: the call may still have taken effect (a reply lost on the way back, a
    stalled server that runs it later), so a reserve that failed this way is released later.
    """

    def __init__(self, message: str, maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


class Store(Protocol):
    stale_after: float  # seconds after which an unsettled reservation counts as spent

    async def reserve(
        self, reservation_id: str, buckets: tuple[Bucket, ...], demand: Demand
    ) -> tuple[Decision, Reservation | None]:
        """Decide and, if admitted, hold the reservation in every bucket in one atomic step."""

    async def settle(self, reservation: Reservation, usage: Usage) -> tuple[LimitStatus, ...]:
        """Replace the reservation by real usage; a second call for the same id changes nothing."""

    async def release(self, reservation: Reservation) -> tuple[LimitStatus, ...]:
        """Drop a reservation that cost nothing upstream."""

    async def status(self, buckets: tuple[Bucket, ...]) -> tuple[LimitStatus, ...]:
        """The windows as they stand now, without changing them."""

    async def learned(self) -> dict[str, str]:
        """Every learned estimate record (`estimates.Record` texts), by key."""

    async def learn(self, updates: Mapping[str, Callable[[str | None], str]]) -> dict[str, str]:
        """Replace each named record by its update of the stored one (None: none yet), in one
        atomic step; then every record, as `learned`. An update may run more than once."""

    async def close(self) -> None: ...


def open_store(spec: StoreSpec, clock: Callable[[], float]) -> Store:
    """The store a spec names; `clock` is the gate's (Redis decides on its server's clock)."""
    if spec.kind == "memory":
        from .memory import MemoryStore

        return MemoryStore(clock, stale_after=spec.reservation_timeout)
    if spec.kind == "sqlite":
        from .sqlite import SqliteStore

        return SqliteStore(spec.path, clock, stale_after=spec.reservation_timeout)
    if spec.kind == "redis":
        from .redis import RedisStore

        return RedisStore(
            spec.url,
            clock=None,
            stale_after=spec.reservation_timeout,
            cluster=spec.cluster,
            cluster_nodes=spec.cluster_nodes,
        )
    raise ValueError(f"unknown store kind {spec.kind!r}")
