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
from dataclasses import dataclass
from fnmatch import fnmatchcase
from fractions import Fraction

TOKEN_DIMENSIONS = ("prompt_tokens", "completion_tokens", "total_tokens")
REQUESTS = "requests"
BUDGET = "usd"  # money: a budget's count and every charge to it are whole micro-dollars
MICRO_USD = 1_000_000  # micro-dollars per dollar
PER_MILLION = 1_000_000  # rates are per million tokens (a price: micro-dollars per 1M tokens)


@dataclass(frozen=True)
class Limit:
    """`count` units of `dimension` per rolling `seconds`, for the requests of the models it
    names (none: every model), in its own scope or (None) its proxy's."""

    dimension: str
    count: int
    seconds: int
    label: str  # as written, e.g. "1m"
    rank: int | None = None  # among the limits of its dimension (set by the loader)
    models: tuple[str, ...] = ()  # glob patterns of the models it applies to; () = all
    scope: str | None = None  # key | proxy, where the limit says; None: its proxy's scope
    cached_weight: Fraction = Fraction(1)  # what a cached prompt token counts (token limits)

    @property
    def name(self) -> str:
        """`total_tokens-1m`, with the model filter and an own scope when the limit has them:
        `total_tokens-1m[gpt-4o*]@proxy`."""
        models = f"[{','.join(self.models)}]" if self.models else ""
        scope = f"@{self.scope}" if self.scope else ""
        return f"{self.dimension}-{self.label}{models}{scope}"

    @property
    def window(self) -> str:
        """What the store calls this limit's window: its dimension and its rank among the
        limits of that dimension (by duration, then by place in the file).

        A count, a duration, a model filter or a budget's amount edited in place keeps the
        window, so a changed limit applies to the usage already spent; and every process
        reading the same file, after a reload or a restart, names it the same. The scope is
        not part of it: the bucket's key says whose window it is. (A limit made outside a
        quotas file goes by its name.)
        """
        return self.name if self.rank is None else f"{self.dimension}#{self.rank}"

    def applies_to(self, model: str | None) -> bool:
        """Whether a request for `model` counts against this limit; a request whose model is
        not known yet counts against every limit (the safe side)."""
        return not self.models or model is None or any(fnmatchcase(model, p) for p in self.models)


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
class Rates:
    """A model's price as a budget reserves it: micro-dollars per million prompt and
    completion tokens (so a token costs rate / PER_MILLION micro-dollars)."""

    prompt: int
    completion: int


@dataclass(frozen=True)
class Demand:
    """What a request asks for: its prompt estimate and the completion tokens it may produce;
    the model's rates where a budget applies; `least`: completion tokens that must fit beside
    the prompt (a strict proxy asks one per completion, then bounds each to what it reserved)."""

    prompt: int
    completion: int
    rates: Rates | None = None
    least: int = 0


@dataclass(frozen=True, slots=True)
class Terms:
    """What one window takes of a request: `base` + ceil(completion * `rate` / PER_MILLION),
    and the request is admitted only where `minimum` is left. Every dimension is this one
    linear rule, so every store (the Lua script too) caps and holds them alike."""

    base: int
    rate: int  # per million completion tokens
    minimum: int

    def amount(self, completion: int) -> int:
        return self.base + -(-completion * self.rate // PER_MILLION)

    def cap(self, remaining: int) -> int | None:
        """The most completion tokens that fit in `remaining`; None: any number."""
        if self.rate == 0:
            return None
        return (remaining - self.base) * PER_MILLION // self.rate


def terms_of(limit: Limit, demand: Demand) -> Terms:
    """The linear rule by which `demand` counts against `limit`."""
    dimension, prompt = limit.dimension, demand.prompt
    least = min(demand.least, demand.completion)
    if dimension == REQUESTS:
        return Terms(1, 0, 1)
    if dimension == "prompt_tokens":
        return Terms(prompt, 0, max(1, prompt))
    if dimension == "completion_tokens":
        return Terms(0, PER_MILLION, max(1, least))
    if dimension == "total_tokens":
        return Terms(prompt, PER_MILLION, max(1, prompt + least))
    if demand.rates is None:
        raise ValueError(f"a {limit.name} budget needs the model's price")
    base = -(-prompt * demand.rates.prompt // PER_MILLION)
    rate = demand.rates.completion
    return Terms(base, rate, max(1, base - (-least * rate // PER_MILLION)))


@dataclass(frozen=True)
class Usage:
    """Tokens a request used. The sub-counts are parts of `prompt` and `completion` that
    providers report and price apart; they are never added to them a second time."""

    prompt: int
    completion: int
    cached_prompt: int = 0  # prompt tokens read from the provider's prompt cache
    cache_write: int = 0  # prompt tokens written to the provider's prompt cache
    reasoning: int = 0  # completion tokens spent on hidden reasoning
    cost: int = 0  # micro-dollars, where the model's price is known (what budgets count)
    service_tier: str | None = None  # the tier the answer says it was served at (prices.py)

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def charged(limit: Limit, usage: Usage) -> int:
    """What `usage` counts against `limit`: a token limit counts cached prompt tokens at its
    weight (rounded up), reasoning tokens once (they are completion tokens), a budget the
    cost, a request limit one."""
    dimension = limit.dimension
    if dimension == REQUESTS:
        return 1
    if dimension == BUDGET:
        return usage.cost
    if dimension == "completion_tokens":
        return usage.completion
    prompt = usage.prompt
    if limit.cached_weight != 1 and usage.cached_prompt > 0:
        cached = min(usage.cached_prompt, prompt)
        prompt += math.ceil(cached * limit.cached_weight) - cached
    return prompt if dimension == "prompt_tokens" else prompt + usage.completion


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
    terms = [terms_of(status.limit, demand) for status in statuses]
    refusals = []
    for index, status in enumerate(statuses):
        need = terms[index].minimum
        if status.remaining < need:
            refusals.append((fits_at(status.limit, charges_of(index), now, need), status))
    if refusals:
        never = [status for at, status in refusals if at is None]
        if never:
            return Decision(False, statuses, blocking=never[0], retry_at=None)
        retry_at, blocking = max(refusals, key=lambda pair: pair[0])
        return Decision(False, statuses, blocking=blocking, retry_at=retry_at)
    completion = demand.completion
    for status, term in zip(statuses, terms, strict=True):
        cap = term.cap(status.remaining)
        if cap is not None:
            completion = min(completion, cap)
    return Decision(True, statuses, reserved=held_for(demand, max(0, completion)))


def held_for(demand: Demand, completion: int) -> Usage:
    """What an admitted `demand` holds once its completion reserve is `completion`: its
    tokens, and their cost at its rates."""
    cost = 0
    if demand.rates is not None:
        cost = -(-demand.prompt * demand.rates.prompt // PER_MILLION)
        cost += -(-completion * demand.rates.completion // PER_MILLION)
    return Usage(demand.prompt, completion, cost=cost)


def held_back_by_reservations(decision: Decision, demand: Demand) -> bool:
    """A refusal that in-flight reservations alone cause: were they all settled at 0, every
    refusing window would admit `demand`. Waiting for them can help; waiting for spent usage
    to expire is what Retry-After is for."""
    if decision.admitted or decision.retry_at is None:
        return False
    needs = [(status, terms_of(status.limit, demand).minimum) for status in decision.statuses]
    return all(
        status.limit.count - status.used >= need
        for status, need in needs
        if status.remaining < need
    )


def settled_view(
    statuses: Iterable[LimitStatus], reserved: Usage, usage: Usage
) -> tuple[LimitStatus, ...]:
    """The windows as they will stand once a reservation of `reserved` settles at `usage`,
    from statuses taken with it held (other flows' changes since then are not seen)."""
    return tuple(
        LimitStatus(
            status.limit,
            status.used + charged(status.limit, usage),
            max(0, status.reserved - charged(status.limit, reserved)),
            status.reset_at,
        )
        for status in statuses
    )


def most_restrictive(statuses: Iterable[LimitStatus]) -> LimitStatus | None:
    """The limit with the fewest units left, the later reset breaking ties."""
    return min(statuses, key=lambda s: (s.remaining, -s.reset_at), default=None)


def seconds_until(at: float, now: float) -> int:
    """Whole seconds to wait, rounded up so that waiting that long is always enough."""
    return max(0, math.ceil(at - now))
