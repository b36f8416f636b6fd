"""What the TokenGate addons tell each other about a flow: one typed record in `flow.metadata`.

mitmproxy saves metadata with the flow, so the record is a plain dict of plain values (a
TypedDict documents its fields) and never holds a secret. Captures saved by earlier versions
carry the same keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypedDict

from mitmproxy import http

if TYPE_CHECKING:
    from .limiter import LimitStatus
    from .usage import Metered

META = "tokengate"


class Charged(TypedDict, total=False):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Parts of the counts above that providers price apart (absent from older captures).
    cached_prompt_tokens: int  # prompt tokens read from the provider's cache
    cache_write_tokens: int  # prompt tokens written to it
    reasoning_tokens: int  # completion tokens spent on hidden reasoning
    service_tier: str  # the tier the answer says it was served at, where it says so
    source: str  # "reported" by the provider, or "estimated" by the gate's tokenizer


class Notes(TypedDict, total=False):
    # Routing (set when a flow is governed).
    candidates: list[str]  # proxies the flow may belong to; the caller's key picks one
    upstream_path: str | None  # reverse mode: path and query below the provider's base URL
    endpoint: str | None  # the metered endpoint, the gate's usage endpoint, or None
    allowed: bool  # metered or read-only; anything else is refused with 403
    deployment: str | None  # the deployment the path names (Azure), or None
    # Who is calling (set once the key is found).
    proxy: str
    key: str  # the key's name, never the key
    key_fp: str  # the first 16 hex digits of the key's stored SHA-256: which entry it was
    # The request.
    model: str | None  # for limits, the ledger and prices
    model_from_answer: bool  # the answer's model replaces `model` (an unnamed Azure deployment)
    stream: bool
    prompt_estimate: int
    max_tokens_requested: int  # the caller's own max tokens, where the gate lowered them
    max_tokens_lowered_to: int
    max_tokens_added: bool  # a strict proxy set the max tokens the caller had not
    usage_injected: bool  # the gate asked a stream for usage; the caller did not
    # The decision.
    answered_by_gate: int  # status of the answer the gate made itself (never forwarded)
    refused_by: str | None  # the limit that refused
    reserved: dict[str, int]  # prompt_tokens, completion_tokens held at admission
    accounting: str  # "degraded": admitted unmetered while the store is down (fail: open)
    limits: dict[str, int]  # every limit's count, by name
    remaining: dict[str, int]  # what each limit has left, by name
    # The outcome.
    usage: Charged | None  # what the call was charged; None: nothing
    cost_micro_usd: int  # what the call cost in micro-dollars, where its model's price is known
    scrubbed: bool  # the provider's answer carried a provider key, replaced before it left
    audited: bool  # its ledger line is written
    measured: bool  # counted in the metrics


def of(flow: http.HTTPFlow) -> Notes | None:
    """The gate's notes on a flow it governs, or None for traffic that is not ours."""
    return flow.metadata.get(META)


def start(flow: http.HTTPFlow, **fields: Any) -> Notes:
    notes: Notes = Notes(**fields)  # type: ignore[typeddict-item]
    flow.metadata[META] = notes
    return notes


def pending(flow: http.HTTPFlow) -> Notes | None:
    """The notes of a governed flow the gate has not answered itself: the guard of every hook
    that acts on a request on its way to the provider."""
    notes = flow.metadata.get(META)
    return None if notes is None or notes.get("answered_by_gate") else notes


def answer(flow: http.HTTPFlow, response: http.Response) -> None:
    """Answer the flow from the gate; upstream is never contacted for it."""
    flow.response = response
    flow.metadata[META]["answered_by_gate"] = response.status_code


def answered_by_gate(flow: http.HTTPFlow) -> bool:
    notes = flow.metadata.get(META)
    return bool(notes and notes.get("answered_by_gate"))


def note_windows(notes: Notes, statuses: Iterable[LimitStatus] | None) -> None:
    """Each limit and what is left of it, for the ledger and the flow's comment.

    None (the store is down, the write waits) leaves the figures noted at admission.
    """
    if statuses is None:
        return
    statuses = tuple(statuses)
    notes["limits"] = {status.limit.name: status.limit.count for status in statuses}
    notes["remaining"] = {status.limit.name: status.remaining for status in statuses}


def note_usage(notes: Notes, metered: Metered | None) -> None:
    """What the call was charged (None: nothing); the model the answer named, where that is
    the call's model (`model_from_answer`)."""
    if metered is None:
        notes["usage"] = None
        return
    if metered.model and notes.get("model_from_answer"):
        notes["model"] = metered.model
    notes["usage"] = {
        "prompt_tokens": metered.usage.prompt,
        "completion_tokens": metered.usage.completion,
        "total_tokens": metered.usage.total,
        "cached_prompt_tokens": metered.usage.cached_prompt,
        "cache_write_tokens": metered.usage.cache_write,
        "reasoning_tokens": metered.usage.reasoning,
        "source": metered.source,
    }
    if metered.usage.service_tier is not None:
        notes["usage"]["service_tier"] = metered.usage.service_tier
