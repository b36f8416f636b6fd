"""Rolling-window quota arithmetic: pure functions over the charges held in each window.

A window holds charges, each stamped with the time its request was admitted. Usage at time t is
the sum of charges stamped in (t - duration, t]. A charge starts as a reservation (prompt
estimate plus a completion reserve) and is replaced by the real usage when the response settles;
a response that costs more than was left keeps its full charge (debt) until it expires.

Every store (memory, SQLite, Redis) keeps the charges its own way but decides with these rules,
so the same trace gives the same decisions everywhere.

Settled charges are merged into time slots (`slot_of`, `merged`) so that a window holds at most
SLOTS + 1 settled records whatever the traffic; reservations in flight stay one record each (a
settle or release must find them). The stores apply the same merge rule, so their windows, and
so their decisions, stay identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

TOKEN_DIMENSIONS = ("prompt_tokens", "completion_tokens", "total_tokens")
REQUESTS = "requests"


@dataclass(frozen=True)
class Limit:
    """`count` units of `dimension` per rolling `seconds`."""

    dimension: str
    count: int
    seconds: int
    label: str  # as written, e.g. "1m"
    rank: int | None = None  # among the limits of its dimension, by duration (set by the loader)

    @property
    def name(self) -> str:
        return f"{self.dimension}-{self.label}"

    @property
    def window(self) -> str:
        """What the store calls this limit's window: its dimension and its rank by duration.

        A count or a duration edited in place keeps the window, so a changed limit applies to
        the usage already spent; and every process reading the same file, after a reload or a
        restart, names it the same. (A limit made outside a quotas file goes by its name.)
        """
        return self.name if self.rank is None else f"{self.dimension}#{self.rank}"


# Slots per window duration. A power of two, so `stamp * SLOTS` is exact, and Python (memory,
# SQLite) and Redis's Lua, both in IEEE doubles, agree on every slot.
SLOTS = 64


@dataclass(frozen=True, slots=True)
class Charge:
    stamp: float
    amount: int
    settled: bool


@dataclass(frozen=True)
class Bucket:
    """One limit applied to one scope (a caller key, or a whole proxy)."""

    key: str
    limit: Limit


@dataclass(frozen=True)
class Demand:
    """What a request asks for: its prompt estimate and the completion tokens it may produce."""

    prompt: int
    completion: int

    def minimum(self, dimension: str) -> int:
        """What must be left in a window of `dimension` for the request to be admitted at all."""
        if dimension in ("prompt_tokens", "total_tokens"):
            return max(1, self.prompt)
        return 1


@dataclass(frozen=True)
class Usage:
    """Tokens a request used. The sub-counts are parts of `prompt` and `completion` that
    providers report and price apart; they are never added to them a second time."""

    prompt: int
    completion: int
    cached_prompt: int = 0  # prompt tokens read from the provider's prompt cache
    cache_write: int = 0  # prompt tokens written to the provider's prompt cache
    reasoning: int = 0  # completion tokens spent on hidden reasoning
    service_tier: str | None = None  # the tier the answer says it was served at (prices.py)

    @property
    def total(self) -> int:
        return self.prompt + self.completion

    def amount(self, dimension: str) -> int:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.total,
            REQUESTS: 1,
        }[dimension]


@dataclass(frozen=True)
class LimitStatus:
    """One window as a caller sees it after a decision."""

    limit: Limit
    used: int  # settled charges in the window
    reserved: int  # charges of requests still in flight
    reset_at: float  # when the window is back to its full count if nothing else is charged

    @property
    def remaining(self) -> int:
        return max(0, self.limit.count - self.used - self.reserved)


@dataclass(frozen=True)
class Decision:
    admitted: bool
    statuses: tuple[LimitStatus, ...]
    reserved: Usage | None = None  # what was reserved, when admitted
    blocking: LimitStatus | None = None  # the limit that refused, when not admitted
    retry_at: float | None = None  # when the refused request would fit; None: never


def whole_number(value: object, minimum: int = 0) -> bool:
    """A count as JSON carries it: an integer >= minimum (JSON's true/false are not counts,
    though Python's bool is an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def slot_of(stamp: float, seconds: int) -> int:
    """The slot a charge stamped `stamp` settles into, in a window of `seconds`: slots are
    seconds / SLOTS wide and counted from the epoch, so every store and process agrees."""
    return math.floor(stamp * SLOTS / seconds)


def merged(slot: Charge | None, stamp: float, amount: int) -> Charge:
    """A slot after a settled charge joins it. The slot keeps the newest stamp merged into it and
    leaves the window with that stamp: a lone charge keeps its exact stamp, the others leave at
    most one slot width (seconds / SLOTS) late, never early, so usage is never under-counted and
    a reset time computed from the slots is when the budget really comes back."""
    if slot is None:
        return Charge(stamp, amount, settled=True)
    return Charge(max(slot.stamp, stamp), slot.amount + amount, settled=True)


def live(charges: Iterable[Charge], seconds: int, now: float) -> list[Charge]:
    return [c for c in charges if c.stamp + seconds > now]


def status_of(limit: Limit, charges: Sequence[Charge], now: float) -> LimitStatus:
    current = live(charges, limit.seconds, now)
    used = sum(c.amount for c in current if c.settled)
    reserved = sum(c.amount for c in current if not c.settled)
    reset_at = max((c.stamp + limit.seconds for c in current), default=now)
    return LimitStatus(limit, used, reserved, reset_at)


def fits_at(limit: Limit, charges: Sequence[Charge], now: float, need: int) -> float | None:
    """The earliest time >= now at which `need` fits in the window; None if it never can."""
    if need > limit.count:
        return None
    current = sorted(live(charges, limit.seconds, now), key=lambda c: c.stamp)
    held = sum(c.amount for c in current)
    if limit.count - held >= need:
        return now
    for charge in current:
        held -= charge.amount
        if limit.count - held >= need:
            return charge.stamp + limit.seconds
    return now  # unreachable: once every charge expires, held is 0 and need <= count


def decide(
    windows: Sequence[tuple[Bucket, Sequence[Charge]]], demand: Demand, now: float
) -> Decision:
    """`decide_on` for windows given as plain lists of charges."""
    statuses = tuple(status_of(bucket.limit, charges, now) for bucket, charges in windows)
    return decide_on(statuses, lambda index: windows[index][1], demand, now)


def decide_on(
    statuses: Sequence[LimitStatus],
    charges_of: Callable[[int], Sequence[Charge]],
    demand: Demand,
    now: float,
) -> Decision:
    """Admit `demand` only if every window has room for its minimum; reserve across all at once.

    `statuses` are the windows now; `charges_of(i)` gives window i's live charges, and is only
    asked for a refusing window (to tell when it will fit), so stores can keep running totals.
    The completion reserve is capped by what is left, so a small quota still admits requests.
    """
    statuses = tuple(statuses)
    refusals = []
    for index, status in enumerate(statuses):
        need = demand.minimum(status.limit.dimension)
        if status.remaining < need:
            refusals.append((fits_at(status.limit, charges_of(index), now, need), status))
    if refusals:
        never = [status for at, status in refusals if at is None]
        if never:
            return Decision(False, statuses, blocking=never[0], retry_at=None)
        retry_at, blocking = max(refusals, key=lambda pair: pair[0])
        return Decision(False, statuses, blocking=blocking, retry_at=retry_at)
    completion = demand.completion
    for status in statuses:
        if status.limit.dimension == "total_tokens":
            completion = min(completion, status.remaining - demand.prompt)
        elif status.limit.dimension == "completion_tokens":
            completion = min(completion, status.remaining)
    return Decision(True, statuses, reserved=Usage(demand.prompt, max(0, completion)))


def held_back_by_reservations(decision: Decision, demand: Demand) -> bool:
    """A refusal that in-flight reservations alone cause: were they all settled at 0, every
    refusing window would admit `demand`. Waiting for them can help; waiting for spent usage
    to expire is what Retry-After is for."""
    if decision.admitted or decision.retry_at is None:
        return False
    return all(
        status.limit.count - status.used >= demand.minimum(status.limit.dimension)
        for status in decision.statuses
        if status.remaining < demand.minimum(status.limit.dimension)
    )


def settled_view(
    statuses: Iterable[LimitStatus], reserved: Usage, usage: Usage
) -> tuple[LimitStatus, ...]:
    """The windows as they will stand once a reservation of `reserved` settles at `usage`,
    from statuses taken with it held (other flows' changes since then are not seen)."""
    return tuple(
        replace(
            status,
            used=status.used + usage.amount(status.limit.dimension),
            reserved=max(0, status.reserved - reserved.amount(status.limit.dimension)),
        )
        for status in statuses
    )


def most_restrictive(statuses: Iterable[LimitStatus]) -> LimitStatus | None:
    """The limit with the fewest units left, the later reset breaking ties."""
    return min(statuses, key=lambda s: (s.remaining, -s.reset_at), default=None)


def seconds_until(at: float, now: float) -> int:
    """Whole seconds to wait, rounded up so that waiting that long is always enough."""
    return max(0, math.ceil(at - now))
