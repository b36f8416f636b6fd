"""QA replay: what the current quotas would have done with captured traffic (`mitmdump -nr`).

A flow read from a file already has its answer, and the live addons leave it alone. This addon
evaluates it instead with the live decision code (the same key check, request reading, learned
estimates, quota service and charging rule) on the capture's own clock
(`request.timestamp_start`) and a store of its own (replaying never spends live budget). Who
called comes from the proxy and key *names* the gate noted when it saved the flow (the key
itself is never saved). The decision goes to the ledger; the flow is not changed. Same capture
and same quotas give the same ledger, byte for byte.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mitmproxy import http

from . import notes
from .admission import note_decision
from .audit import decision_of, entry
from .dialects import Dialect
from .estimates import counted_whole
from .gate import Gate
from .intake import Reader, Unreadable
from .limiter import Demand, Usage, whole_number
from .notes import Notes
from .quota import Ask, QuotaService, Refusal
from .reporting import Reporting
from .routing import USAGE_ENDPOINT
from .stores.memory import MemoryStore
from .usage import Metered, StreamMeter, caller_hung_up, charge, meter_json


class CaptureClock:
    """The time of the captured request being evaluated."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def from_capture(flow: http.HTTPFlow) -> bool:
    """Read from a file with its answer (`-nr`), as opposed to live or client-replayed."""
    return not flow.live and (flow.response is not None or flow.error is not None)


class CaptureReplay:
    """Runs before AdmissionControl, which drops the notes a flow was saved with."""

    def __init__(self, gate: Gate, reporting: Reporting) -> None:
        self.gate = gate
        self.reporting = reporting
        self.clock = CaptureClock()
        self.quota = QuotaService(
            Gate(store=MemoryStore(self.clock), clock=self.clock), queue_limit=0
        )
        self.quota.gate.estimates.policy = gate.estimates.policy  # learns on its own store
        self._saved: dict[str, dict[str, Any]] = {}

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        saved = notes.of(flow)
        if saved is not None and from_capture(flow):
            self._saved[flow.id] = dict(saved)

    async def response(self, flow: http.HTTPFlow) -> None:
        await self._evaluate(flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        await self._evaluate(flow)

    async def _evaluate(self, flow: http.HTTPFlow) -> None:
        saved = self._saved.pop(flow.id, None)
        if saved is None or self.gate.config is None:
            return
        self.clock.now = flow.request.timestamp_start
        self.quota.gate.config = self.gate.config  # its prices, as live
        note = Notes(
            proxy=saved.get("proxy"),
            key=saved.get("key"),
            key_fp=saved.get("key_fp"),
            endpoint=saved.get("endpoint"),
        )
        status, decision = await self._decide(flow, saved, note)
        await self.quota.gate.writes.caught_up()
        self.reporting.write({**entry(flow, note, status, decision), "replay": True})

    async def _decide(
        self, flow: http.HTTPFlow, saved: dict[str, Any], note: Notes
    ) -> tuple[int | None, str]:
        """(status the caller would get now, decision) for one captured flow."""
        proxy = self.gate.proxy(note["proxy"] or "")
        key = next((key for key in proxy.keys if key.name == note["key"]), None) if proxy else None
        if key is None or key.expired(self.clock.now):  # as live: the gate's clock decides
            return 401, "unauthorized"
        if not saved.get("allowed"):
            return 403, "forbidden"
        captured = flow.response.status_code if flow.response is not None else None
        endpoint = note["endpoint"]
        if endpoint is None:  # the model list: allowed, not metered
            return captured, "admitted"
        if endpoint == USAGE_ENDPOINT:
            notes.note_windows(note, await self.quota.standing(proxy, key.name))
            return captured, "answered"
        reader = Reader(
            proxy.dialect,
            self.gate.exact_prompt_chars,
            proxy.completion_reserve,
            saved.get("deployment"),
        )
        read = await reader.read(flow.request.get_content(strict=False) or b"", endpoint)
        if isinstance(read, Unreadable):  # as live: refused before it leaves
            return 400, "invalid"
        proxy.dialect.as_requested(read.body, saved)
        terms = reader.terms(endpoint, read.body)
        note.update(model=terms.model, stream=terms.stream)
        if terms.model_from_answer:
            note["model_from_answer"] = True
        if not proxy.allows(terms.model):
            return 403, "forbidden"
        learned = self.quota.gate.estimates
        prompt = learned.prompt(
            proxy.provider.name, terms.model, read.prompt, proxy.dialect.estimate_has_margin
        )
        demand = Demand(prompt, terms.completion_reserve)
        ask = Ask(
            flow.id,
            proxy,
            key.name,
            demand,
            proxy.dialect,
            model=terms.model,
            completions=terms.completions,
            service_tier=terms.service_tier,
        )
        outcome = await self.quota.admit(ask)
        if outcome is None:  # a proxy without limits
            return captured, "admitted"
        note_decision(note, outcome)
        if isinstance(outcome, Refusal):  # 429, or 403 for a model a budget cannot price
            return outcome.answer.status_code, decision_of(outcome.answer.status_code)
        reserved = outcome.reservation.amounts
        # As live: a max tokens above what is left is lowered, so the provider could not have
        # produced more than was reserved; the capture may hold a longer answer (sent under
        # roomier quotas), which these quotas would have cut.
        changed = proxy.dialect.adjust(endpoint, read.body, reserved, strict=proxy.strict)
        lowered = "max_tokens_lowered_to" in changed
        if lowered:
            note["max_tokens_lowered_to"] = changed["max_tokens_lowered_to"]
        if saved.get("answered_by_gate"):
            # The gate refused it then, so the capture holds no provider answer to go by: the
            # reservation is charged, as an estimate.
            metered, status = Metered(reserved, "estimated"), None
        else:
            answered = None
            if captured is not None and captured < 400:
                answered = captured_usage(proxy.dialect, flow.response, read.prompt, terms.model)
                answered = reported_live(answered, saved)
                if lowered:
                    answered = capped(answered, reserved.completion)
            message = flow.error.msg if flow.error else ""
            sent = caller_hung_up(message) and bool(flow.server_conn.timestamp_start)
            metered, status = charge(captured, answered, reserved, sent), captured
        notes.note_windows(note, self.quota.settle(flow.id, metered.usage if metered else None))
        exact = counted_whole(flow.request, self.gate.exact_prompt_chars)
        learned.answered(proxy.provider.name, terms.model, read.prompt, metered, exact)
        if metered is not None:
            notes.note_usage(note, metered)
            cost = outcome.cost(metered.usage)
            if cost is not None:
                note["cost_micro_usd"] = cost
        return status, "admitted"


def captured_usage(
    dialect: Dialect, response: http.Response, prompt: int, model: str | None
) -> Metered:
    """Usage from a captured answer: JSON, or SSE saved with `store_streamed_bodies`."""
    body = response.get_content(strict=False) or b""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        meter = StreamMeter(dialect.stream, prompt, model)
        meter.feed(body)
        return meter.result()
    return meter_json(dialect, body, prompt, model)


def reported_live(metered: Metered, saved: dict[str, Any]) -> Metered:
    """Where the gate asked a stream for usage, it removed that usage chunk from what the
    caller got, and so from the capture: the provider's figures are the ones noted live, with
    the parts priced apart (cached, cache writes, reasoning; absent from older captures: 0) and
    the service tier, so that the call costs what it cost live."""
    live = saved.get("usage")
    if (
        metered.source != "estimated"
        or not saved.get("usage_injected")
        or not isinstance(live, dict)
    ):
        return metered
    prompt, completion = live.get("prompt_tokens"), live.get("completion_tokens")
    cached, written, reasoning = (
        live.get(name, 0)
        for name in ("cached_prompt_tokens", "cache_write_tokens", "reasoning_tokens")
    )
    counts = (prompt, completion, cached, written, reasoning)
    if live.get("source") != "reported" or not all(whole_number(count) for count in counts):
        return metered
    tier = live.get("service_tier")
    usage = Usage(
        prompt,
        completion,
        cached_prompt=min(cached, prompt),
        cache_write=min(written, prompt - min(cached, prompt)),
        reasoning=min(reasoning, completion),
        service_tier=tier if isinstance(tier, str) else None,
    )
    return Metered(usage, "reported", metered.model)


def capped(metered: Metered, completion: int) -> Metered:
    """The usage of an answer whose max tokens would have been lowered to `completion`."""
    usage = metered.usage
    if usage.completion <= completion:
        return metered
    cut = replace(usage, completion=completion, reasoning=min(usage.reasoning, completion))
    return replace(metered, usage=cut)
