"""Estimates that learn: how each provider's prompt count compares with the gate's estimate.

The gate estimates a prompt with tiktoken before sending it. A provider may count otherwise:
another model's tokenizer behind an OpenAI-compatible server, hidden overheads, tools, images.
For each (provider, model) the gate keeps a `Record` of the ratios reported prompt tokens /
estimate of the answers it settled, and reserves `ceil(estimate * factor)`:

- the factor is an upper bound of recent ratios, not their mean: a decayed maximum. A ratio
  above the bound raises it at once; each ratio below pulls it down by `RELEASE` of the gap,
  so a high ratio keeps counting for the next few dozen answers, and a provider that changes
  its count is followed within about as many;
- cold (fewer than `Policy.warmup` answers seen) the factor is at least `Policy.margin` for a
  model the gate counts with the fallback encoding (not in tiktoken's table, or an encoding not
  shipped) and at least 1 for one counted with its own; a higher ratio seen meanwhile counts at
  once;
- ratios are clamped to [MIN_RATIO, MAX_RATIO]: past them the estimate is not a tokenizer's
  error but something else (a provider's hidden system prompt, a broken usage report); prompts
  under MIN_ESTIMATE tokens, whose ratios are mostly rounding, teach nothing.

The records live in the usage store (`learned` / `learn`), so a restart and every gateway on
the same store start from what was learned. Requests never wait for it: admission reads a
cached view, answers are folded into it at once, and a task syncs with the store in the
background (at most every `SYNC_SECONDS` after an answer, and every `REFRESH_SECONDS` while
requests come). QA replay uses the same code on its own store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import tiktoken.model
from mitmproxy import http

from . import tokens
from .stores import StoreUnavailable

if TYPE_CHECKING:
    from .stores import Store
    from .usage import Metered

log = logging.getLogger("tokengate")

MIN_RATIO, MAX_RATIO = 0.25, 4.0
# Below this many tokens a difference of a token or two is a ratio of several %: rounding, not
# the provider's rule, and it would inflate the reservations of long prompts. Not learned from.
MIN_ESTIMATE = 32
RELEASE = 1 / 32  # share of the gap to a lower ratio the bound gives up per answer
DEFAULT_MARGIN = 1.25  # cold factor for a model counted with the fallback encoding
DEFAULT_WARMUP = 8  # answers before the learned bound alone decides
SYNC_SECONDS = 1.0  # an answer reaches the store within this long
REFRESH_SECONDS = 5.0  # what other gateways learned is read at least this often (under traffic)
MAX_RECORDS = 1000  # (provider, model) pairs learned per gateway; more are not learned
MAX_PENDING = 10_000  # ratios kept while the store is down
ROUNDING = 1e-9  # 10 * (11 / 10) is 11.000000000000002 in floats: still 11 tokens


@dataclass(frozen=True)
class Record:
    """What was learned for one (provider, model): answers seen and the decayed maximum."""

    answers: int
    bound: float

    def seen(self, ratio: float) -> Record:
        if self.answers == 0 or ratio >= self.bound:
            return Record(self.answers + 1, ratio)
        return Record(self.answers + 1, self.bound - (self.bound - ratio) * RELEASE)

    def text(self) -> str:
        return json.dumps({"answers": self.answers, "bound": self.bound})

    @classmethod
    def parse(cls, text: str | None) -> Record | None:
        """A stored record; None for none, or for one that does not read as a record."""
        try:
            data = json.loads(text) if text else None
            answers, bound = data["answers"], data["bound"]
        except (ValueError, TypeError, KeyError):
            return None
        if isinstance(answers, bool) or not isinstance(answers, int) or answers < 0:
            return None
        if not isinstance(bound, (int, float)) or not MIN_RATIO <= bound <= MAX_RATIO:
            return None
        return cls(answers, float(bound))


EMPTY = Record(0, 1.0)


def fold(record: Record | None, ratios: Iterable[float]) -> Record:
    for ratio in ratios:
        record = (record or EMPTY).seen(ratio)
    return record or EMPTY


def ratio(estimate: int, reported: int) -> float | None:
    """Reported / estimated prompt tokens, clamped; None where there is nothing to compare
    (a prompt too short to tell, or no count)."""
    if estimate < MIN_ESTIMATE or reported <= 0:
        return None
    return min(MAX_RATIO, max(MIN_RATIO, reported / estimate))


def counted_whole(request: http.Request, exact_chars: int) -> bool:
    """Whether the gate tokenized all of the request's prompt (a body no longer than the exact
    budget; one streamed without a length is not known to be)."""
    size = request.headers.get("content-length", "")
    if request.raw_content is not None:
        size = str(len(request.raw_content))
    return size.isdigit() and int(size) <= exact_chars


def key_of(provider: str, model: str | None) -> str:
    """A record's key: provider names have no '/', model names may."""
    return f"{provider}/{model or ''}"


@lru_cache(maxsize=1024)
def tokenizer_known(model: str | None) -> bool:
    """The estimate uses the model's own encoding: tiktoken knows the model, and the gate ships
    its encoding (otherwise it counts with the fallback)."""
    try:
        name = tiktoken.model.encoding_name_for_model(model or "")
    except KeyError:
        return False
    return name in tokens.SHIPPED_ENCODINGS


@dataclass
class Policy:
    """The cold start: how many answers make a record warm, and the margin until then.
    One object, shared by the live gate and QA replay (the options set it in place)."""

    margin: float = DEFAULT_MARGIN
    warmup: int = DEFAULT_WARMUP

    def factor(self, record: Record | None, model: str | None, has_margin: bool = False) -> float:
        """`has_margin`: the dialect's estimate carries its own margin for the unknown
        tokenizer, so cold it is taken as it is."""
        if record is not None and record.answers >= self.warmup:
            return record.bound
        cold = 1.0 if has_margin or tokenizer_known(model) else self.margin
        return cold if record is None else max(cold, record.bound)


def corrected(estimate: int, factor: float) -> int:
    """The prompt tokens to reserve for an estimate."""
    return max(1, math.ceil(estimate * factor - ROUNDING)) if estimate > 0 else 0


class Estimates:
    """The learned records of one gate: a view for admission, synced with its store."""

    def __init__(self, store: Callable[[], Store], policy: Policy | None = None) -> None:
        self._store = store  # the gate's store of the moment (a reload may replace it)
        self.policy = policy or Policy()
        self._view: dict[str, Record] = {}  # the store's records with the answers not yet sent
        self._pending: dict[str, list[float]] = {}  # ratios not yet in the store, by key
        self._fresh_until = 0.0  # monotonic time from which the view is read again
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._closed = False  # the gate is stopping: no more background syncs

    def record(self, provider: str, model: str | None) -> Record | None:
        return self._view.get(key_of(provider, model))

    def prompt(
        self, provider: str, model: str | None, estimate: int, has_margin: bool = False
    ) -> int:
        """The prompt tokens to reserve for `estimate`: corrected by what was learned."""
        if time.monotonic() >= self._fresh_until:
            self._soon(0.0)
        factor = self.policy.factor(self.record(provider, model), model, has_margin)
        return corrected(estimate, factor)

    def answered(
        self,
        provider: str,
        model: str | None,
        estimate: int,
        metered: Metered | None,
        exact: bool = True,
    ) -> None:
        """Learn from a settled answer: only from prompt counts the provider reported, and only
        where the estimate was a tokenizer's count (`exact`: not bounded by bytes)."""
        if metered is None or metered.source != "reported" or not exact:
            return
        found = ratio(estimate, metered.usage.prompt)
        key = key_of(provider, model)
        if found is None or (key not in self._view and len(self._view) >= MAX_RECORDS):
            return
        if sum(map(len, self._pending.values())) < MAX_PENDING:
            self._pending.setdefault(key, []).append(found)
        self._view[key] = (self._view.get(key) or EMPTY).seen(found)
        self._soon(SYNC_SECONDS)

    def start(self) -> None:
        """Read what was learned now (the gate starts), in the background."""
        self._soon(0.0)

    def _soon(self, delay: float) -> None:
        """Sync in the background within `delay` seconds, unless a sync is already due."""
        if self._timer is not None or self._task is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(delay, self._begin)

    def _begin(self) -> None:
        self._timer = None
        self._task = asyncio.get_running_loop().create_task(
            self._background(), name="tokengate estimates"
        )

    async def _background(self) -> None:
        try:
            await self.sync()
        except Exception:  # a bug here must not go unnoticed, nor stop later syncs
            log.exception("tokengate: syncing the learned estimates failed")
        finally:
            self._task = None
            self._fresh_until = time.monotonic() + REFRESH_SECONDS
            if self._pending:
                self._soon(SYNC_SECONDS)

    async def close(self) -> None:
        """Stop syncing in the background, and send what is left (before the store closes)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self.sync()

    async def sync(self) -> None:
        """Send the answers learned here to the store and read back every record, so the view
        holds what all gateways on the store learned. A store that is down keeps them here."""
        async with self._lock:
            batch, self._pending = self._pending, {}
            store = self._store()
            try:
                if batch:
                    updates = {key: _folder(ratios) for key, ratios in batch.items()}
                    texts = await store.learn(updates)
                else:
                    texts = await store.learned()
            except StoreUnavailable as e:
                for key, ratios in batch.items():  # before any that came meanwhile
                    self._pending[key] = ratios + self._pending.get(key, [])
                log.debug("tokengate: learned estimates not synced: %s", e)
                return
            stored = {key: Record.parse(text) for key, text in texts.items()}
            view = {key: record for key, record in stored.items() if record is not None}
            for key, ratios in self._pending.items():  # answers that came during the call
                view[key] = fold(view.get(key), ratios)
            self._view = view


def _folder(ratios: list[float]) -> Callable[[str | None], str]:
    """What a store applies to one stored record: these ratios, in order."""
    return lambda text: fold(Record.parse(text), ratios).text()
