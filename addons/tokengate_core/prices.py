"""What a call costs in money: the one place prices are looked up and a call's cost computed.
(A reservation's money is the limiter's linear rule at these rates, `limiter.Rates`, applied
inside the store call with the other limits.)

Prices are USD per 1M tokens, held as integer micro-dollars per 1M tokens (2.50 -> 2_500_000),
so the cost of a call is an integer sum divided once by 1M and rounded up: exact, never a float,
a microsecond or so. They come from `prices:` in quotas.yaml first, then from pydantic's
genai-prices table, which ships its data offline. That table (some 30 MB of memory and 0.3 s)
is imported on a thread when a configuration with a budget is installed, and waited for off the
event loop by a budgeted request that comes before it is in: a gate with no budget never loads
it. Each model
is resolved once (genai-prices' own `calc_price` takes ~100 µs a call) and kept until its
prices could change (a new price's start date, an off-peak hour).
"""

from __future__ import annotations

import asyncio
import fnmatch
import math
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .limiter import Usage

MICRO = 1_000_000  # micro-dollars in a dollar, and tokens in a price's unit (1M tokens)
MAX_USD_PER_M = 100_000  # a price above this per 1M tokens is a typing mistake
FIELDS = ("input", "cached_input", "cache_write", "output")
# A service tier the table does not list for a model: priority costs this many times the
# standard price (the highest ratio the bundled table has, OpenAI's 2x), so a budget never counts
# it short. Flex, batch and any other tier cost the standard price, an upper bound: each is a
# discount where the table lists it (0.25x to 1x).
UNLISTED_TIER_FACTOR = {"priority": 2}
MAX_CACHED_MODELS = 4096  # model names callers send are unbounded; the cache is not


@dataclass(frozen=True, slots=True)
class Price:
    """Micro-dollars per 1M tokens of each kind.

    `above`: long-context rates, (prompt tokens, Price) in ascending order; a prompt of more
    than that many tokens pays those rates on all its tokens (Gemini, Claude above 200k).
    `tiers`: the price under a service tier the answer names (`flex`, `priority`, `batch`, ...).
    """

    input: int
    output: int
    cached_input: int
    cache_write: int
    above: tuple[tuple[int, Price], ...] = ()
    tiers: Mapping[str, Price] = field(default_factory=dict, compare=False)

    @classmethod
    def usd(
        cls,
        input: Decimal | str | float,
        output: Decimal | str | float,
        cached_input: Decimal | str | float | None = None,
        cache_write: Decimal | str | float | None = None,
    ) -> Price:
        """From USD per 1M tokens; cached input and cache writes cost the input price unless
        given. A rate finer than a micro-dollar per 1M tokens is rounded up."""
        rate = micro_per_m(input)
        return cls(
            input=rate,
            output=micro_per_m(output),
            cached_input=rate if cached_input is None else micro_per_m(cached_input),
            cache_write=rate if cache_write is None else micro_per_m(cache_write),
        )

    def at(self, prompt_tokens: int) -> Price:
        """The rates a prompt of this many tokens pays."""
        for start, price in reversed(self.above):
            if prompt_tokens > start:
                return price
        return self

    def under(self, service_tier: str | None) -> Price:
        """The price under a service tier (None or unknown: the standard price)."""
        if service_tier is None:
            return self
        return self.tiers.get(service_tier, self)


def micro_per_m(usd_per_m: Decimal | str | float) -> int:
    """USD per 1M tokens -> integer micro-dollars per 1M tokens, rounded up."""
    return math.ceil(Decimal(str(usd_per_m)) * MICRO)


def cost(usage: Usage, price: Price, service_tier: str | None = None) -> int:
    """Micro-dollars a settled call costs, rounded up.

    Cached prompt tokens and cache writes are parts of the prompt, priced at their own rates;
    the rest of the prompt at the input rate; the completion, reasoning tokens included (they are
    part of it), at the output rate: no token is priced twice. The rates are those of the
    service tier the answer named (`usage.service_tier`, unless `service_tier` is given).
    """
    price = price.under(service_tier or usage.service_tier).at(usage.prompt)
    fresh = max(0, usage.prompt - usage.cached_prompt - usage.cache_write)
    total = (
        fresh * price.input
        + usage.cached_prompt * price.cached_input
        + usage.cache_write * price.cache_write
        + usage.completion * price.output
    )
    return -(-total // MICRO)


def usd(micro: int) -> float:
    """Micro-dollars as a JSON number of dollars. Exact: the float's shortest text is the
    6-decimal figure for any amount below a billion dollars; read it back with
    round(value * 1_000_000)."""
    return micro / MICRO


def usd_text(micro: int) -> str:
    """Micro-dollars as text for people: `$0.007250`."""
    return f"${micro // MICRO}.{micro % MICRO:06d}"


class PriceError(ValueError):
    """A bad `prices:` entry; `field` names the part that is wrong (None: the entry)."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.field = field


def parse_price(raw: Any) -> Price:
    """A `prices:` entry, `{input: 2.50, cached_input: 1.25, cache_write: 3.75, output: 10}`
    (USD per 1M tokens; input and output required; cached input and cache writes cost the input
    price unless given), or PriceError saying what is wrong."""
    if not isinstance(raw, Mapping):
        raise PriceError(
            "a price must be a mapping like {input: 2.50, output: 10.00} (USD per 1M tokens)"
        )
    for name in raw:
        if name not in FIELDS:
            raise PriceError(f"unknown field {name!r} (known: {', '.join(FIELDS)})", str(name))
    for name in ("input", "output"):
        if name not in raw:
            raise PriceError(f"a price needs {name!r} (USD per 1M tokens)")
    values = {name: _amount(raw[name], name) for name in FIELDS if name in raw}
    return Price.usd(**values)


def _amount(value: Any, name: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise PriceError(f"{name} must be a number of USD per 1M tokens, not {value!r}", name)
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise PriceError(
            f"{name} must be a number of USD per 1M tokens, not {value!r}", name
        ) from None
    if not amount.is_finite() or amount < 0 or amount > MAX_USD_PER_M:
        raise PriceError(
            f"{name} must be between 0 and {MAX_USD_PER_M} USD per 1M tokens, not {value}", name
        )
    if amount != amount.quantize(Decimal("0.000001"), rounding="ROUND_DOWN"):
        raise PriceError(f"{name} {value} has more than 6 decimals (micro-dollars)", name)
    return amount


def is_glob(name: str) -> bool:
    return any(char in name for char in "*?[")


@dataclass(slots=True)
class _Resolved:
    price: Price | None
    since: float  # the prices held from this moment
    until: float  # ... up to this one


class PriceBook:
    """Prices by model name: `prices:` overrides first (exact names, then globs in file order),
    then the bundled genai-prices table, resolved once per model and provider URL and cached
    while the table's prices for it stay the same."""

    def __init__(self, overrides: Mapping[str, Price] | None = None) -> None:
        overrides = {name: _with_tiers(p, {}) for name, p in (overrides or {}).items()}
        self._exact = {name: p for name, p in overrides.items() if not is_glob(name)}
        self._globs = [(name, p) for name, p in overrides.items() if is_glob(name)]
        self._cache: dict[tuple[str, str | None], _Resolved] = {}

    def price(
        self, model: str, *, api_url: str | None = None, at: float | None = None
    ) -> Price | None:
        """The price of `model` (None: unknown). `api_url`, the provider's base URL, picks the
        provider in the table when it is one it knows (else the model name does); `at` is the
        call's time (default now): the table's prices change over time."""
        found = self.override(model)
        if found is not None:
            return found
        at = time.time() if at is None else at
        key = (model, api_url)
        cached = self._cache.get(key)
        if cached is not None and cached.since <= at < cached.until:
            return cached.price
        if len(self._cache) >= MAX_CACHED_MODELS:
            self._cache.clear()
        resolved = self._cache[key] = _resolve(model, api_url, at)
        return resolved.price

    def override(self, model: str) -> Price | None:
        """The price `prices:` gives `model` (None: it names none); never loads the table."""
        found = self._exact.get(model)
        if found is not None:
            return found
        for pattern, price in self._globs:
            if fnmatch.fnmatchcase(model, pattern):
                return price
        return None

    @staticmethod
    def load() -> None:
        """Import the bundled table now (0.25 s), blocking; off the event loop, see
        `load_in_background` and `loaded`."""
        _table()

    @staticmethod
    def load_in_background() -> None:
        """Start importing the bundled table on a thread (a configuration with a budget was
        installed), so that neither the event loop nor the first budgeted request waits for
        the 0.3-0.6 s it takes."""
        if not _LOADED.is_set():
            threading.Thread(target=_table, name="tokengate-prices", daemon=True).start()

    @staticmethod
    async def loaded() -> None:
        """Return once the bundled table is imported, waiting for it on a worker thread (an
        import in progress on another thread is waited for there, never on the loop)."""
        if not _LOADED.is_set():
            await asyncio.to_thread(_table)


_LOADED = threading.Event()  # set once the bundled table is imported


def _table():
    """genai-prices' providers, imported on first use only."""
    from genai_prices.data import providers

    _LOADED.set()
    return providers


def _resolve(model: str, api_url: str | None, at: float) -> _Resolved:
    """The table's price of a model at a moment, and how long it holds."""
    from genai_prices import types

    moment = datetime.fromtimestamp(at, UTC)
    since, until = _stable_span(moment)
    providers = _table()
    provider = _provider(providers, model.lower(), api_url)
    info = provider.find_model(model, all_providers=providers) if provider else None
    if info is None:
        return _Resolved(None, since, until)
    for constraint in _constraints(info):
        if isinstance(constraint, types.TimeOfDateConstraint):
            since, until = _time_of_day_span(constraint, moment, since, until)
    standard = _from_model_price(info.get_prices(moment))
    if standard is None:
        return _Resolved(None, since, until)
    tiers: dict[str, Price] = {}
    if any(info is own for own in provider.models):  # as calc_price: no variants on fallbacks
        for context in _variant_contexts(info):
            variant = _from_model_price(info.get_prices(moment, context))
            if variant is not None and variant != standard:
                tiers[context.get("service_tier", "batch")] = variant
    return _Resolved(_with_tiers(standard, tiers), since, until)


def _provider(providers: list, model: str, api_url: str | None):
    """The provider the URL names, else the first whose models the name matches (genai-prices'
    own rule, without its caches, which grow with every name callers send)."""
    if api_url is not None:
        for provider in providers:
            if re.match(provider.api_pattern, api_url):
                return provider
    for provider in providers:
        if provider.model_match is not None and provider.model_match.is_match(model):
            return provider
    return None


def _constraints(info) -> list:
    conditional = info.prices if isinstance(info.prices, list) else []
    return [c.constraint for c in (*conditional, *(info.price_variants or ())) if c.constraint]


def _variant_contexts(info) -> list[dict[str, str]]:
    contexts = []
    for variant in info.price_variants or ():
        when = dict(variant.when)
        tier = {"service_tier": when.get("service_tier")}
        if when in (tier, {"processing": "batch"}) and when not in contexts:
            contexts.append(when)
    return contexts


def _stable_span(moment: datetime) -> tuple[float, float]:
    """Start dates are UTC days: prices resolved at a moment hold for that day."""
    day = datetime.combine(moment.date(), datetime.min.time(), UTC)
    return day.timestamp(), (day + timedelta(days=1)).timestamp()


def _time_of_day_span(constraint, moment: datetime, since: float, until: float):
    """Narrow (since, until) to the stretch of the day where an off-peak rule does not change."""
    day = moment.date()
    for edge in (constraint.start_time, constraint.end_time):
        for when in (day - timedelta(days=1), day, day + timedelta(days=1)):
            stamp = _at_time(when, edge)
            if stamp <= moment.timestamp():
                since = max(since, stamp)
            else:
                until = min(until, stamp)
    return since, until


def _at_time(day: date, moment_of_day) -> float:
    combined = datetime.combine(day, moment_of_day)
    if combined.tzinfo is None:
        combined = combined.replace(tzinfo=UTC)
    return combined.timestamp()


def _from_model_price(model_price) -> Price | None:
    """genai-prices' ModelPrice (Decimal USD per 1M tokens, or threshold tiers) as a Price; None
    when it has neither an input nor an output rate (a model the table lists but cannot price)."""
    rates = {
        "input": getattr(model_price, "input_mtok", None),
        "cached_input": getattr(model_price, "cache_read_mtok", None),
        "cache_write": getattr(model_price, "cache_write_mtok", None),
        "output": getattr(model_price, "output_mtok", None),
    }
    if rates["input"] is None and rates["output"] is None:
        return None
    starts = sorted({t.start for r in rates.values() if hasattr(r, "tiers") for t in r.tiers})

    def flat(threshold: int | None) -> Price:
        chosen = {name: _rate_at(rate, threshold) for name, rate in rates.items()}
        chosen["input"] = chosen["input"] or Decimal(0)
        chosen["output"] = chosen["output"] or Decimal(0)
        return Price.usd(**chosen)

    base = flat(None)
    if not starts:
        return base
    above = tuple((start, flat(start)) for start in starts)
    return Price(base.input, base.output, base.cached_input, base.cache_write, above)


def _rate_at(rate, threshold: int | None) -> Decimal | None:
    """A rate for prompts above `threshold` tokens (None: the base rate)."""
    if rate is None or not hasattr(rate, "tiers"):
        return rate
    chosen = rate.base
    for tier in rate.tiers:
        if threshold is not None and tier.start <= threshold:
            chosen = tier.price
    return chosen


def _scaled(price: Price, factor: int) -> Price:
    return Price(
        price.input * factor,
        price.output * factor,
        price.cached_input * factor,
        price.cache_write * factor,
        tuple((start, _scaled(p, factor)) for start, p in price.above),
    )


def _with_tiers(price: Price, tiers: dict[str, Price]) -> Price:
    """`price` with the tiers the table lists, and those it does not list priced by
    UNLISTED_TIER_FACTOR."""
    tiers = {**tiers, **price.tiers}
    for tier, factor in UNLISTED_TIER_FACTOR.items():
        tiers.setdefault(tier, _scaled(price, factor))
    return Price(
        price.input, price.output, price.cached_input, price.cache_write, price.above, tiers
    )
