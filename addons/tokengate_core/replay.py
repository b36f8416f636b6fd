"""QA replay: what the current quotas would have done with captured traffic (`mitmdump -nr`).

A flow read from a file already has its answer, and the live addons leave it alone. This addon
evaluates it instead, on the capture's own clock (`request.timestamp_start`) against a store of
its own (replaying never spends live budget): who called (the proxy and key *names* the gate
noted when it saved the flow), whether the key and endpoint are still accepted, whether the
reservation fits, and the usage the captured response reports. The decision goes to the ledger;
the flow itself is not changed. Same capture and same quotas give the same ledger, byte for byte.
"""

from __future__ import annotations

from typing import Any

from mitmproxy import http

from . import flowstate
from .audit import Ledger, entry
from .limiter import Demand
from .metering import (
    buckets_for,
    caller_hung_up,
    completion_reserve,
    max_tokens_field,
    note_decision,
    note_windows,
    read_request,
    usage_record,
)
from .routing import USAGE_ENDPOINT
from .settings import Gate
from .stores.memory import MemoryStore
from .tokens import model_of
from .usage import Metered, StreamMeter, meter_json, whole_number


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
    """Runs before the Router, which drops the notes a flow was saved with."""

    def __init__(self, gate: Gate, ledger: Ledger) -> None:
        self.gate = gate
        self.ledger = ledger
        self.clock = CaptureClock()
        self.store = MemoryStore(self.clock)
        self._saved: dict[str, dict[str, Any]] = {}

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        saved = flowstate.governed(flow)
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
        state = {key: saved.get(key) for key in ("proxy", "key", "key_fp", "endpoint")}
        status, decision = await self._decide(flow, saved, state)
        self.ledger.write({**entry(flow, state, status, decision), "replay": True})

    async def _decide(
        self, flow: http.HTTPFlow, saved: dict, state: dict
    ) -> tuple[int | None, str]:
        """(status the caller would get now, decision) for one captured flow."""
        proxy = self.gate.proxy(state["proxy"] or "")
        key = next((key for key in proxy.keys if key.name == state["key"]), None) if proxy else None
        if key is None or key.expired(self.clock.now):  # as live: the gate's clock decides
            return 401, "unauthorized"
        if not saved.get("allowed"):
            return 403, "forbidden"
        captured = flow.response.status_code if flow.response is not None else None
        if state["endpoint"] is None:  # the model list: allowed, not metered
            return captured, "admitted"
        buckets = buckets_for(proxy, state["key"])
        if state["endpoint"] == USAGE_ENDPOINT:
            note_windows(state, await self.store.status(buckets))
            return captured, "answered"
        raw = flow.request.get_content(strict=False) or b""
        body, prompt = await read_request(raw, state["endpoint"], self.gate.exact_prompt_chars)
        if body is None or prompt is None:  # as live: unreadable, refused before it leaves
            return 400, "invalid"
        as_requested(body, saved)
        model = model_of(body)
        state.update(model=model, stream=body.get("stream") is True)
        reserve = completion_reserve(body, state["endpoint"], proxy.completion_reserve)
        decision, reservation = await self.store.reserve(flow.id, buckets, Demand(prompt, reserve))
        note_decision(state, decision, reservation)
        if reservation is None:
            return 429, "refused"
        amounts = reservation.amounts
        if saved.get("answered_by_gate"):
            # The gate refused it then, so the capture holds no provider answer to go by: the
            # reservation is charged, as an estimate.
            metered, status = Metered(amounts, "estimated"), None
        elif captured is None and caller_hung_up(flow) and flow.server_conn.timestamp_start:
            # As live: the provider got the request, and hanging up does not make it free.
            metered, status = Metered(amounts, "estimated"), None
        elif captured is None or captured >= 400:
            # As live: a provider error, or no answer at all, costs nothing.
            note_windows(state, await self.store.release(reservation))
            return captured, "admitted"
        else:
            metered, status = captured_usage(flow.response, prompt, model), captured
        note_windows(state, await self.store.settle(reservation, metered.usage))
        state["usage"] = usage_record(metered)
        return status, "admitted"


def as_requested(body: dict[str, Any], saved: dict[str, Any]) -> None:
    """Put back the caller's own max tokens where the gate had lowered them (in place).

    The capture holds the request as it was sent upstream, after the gate lowered its
    `max_tokens` (or `max_completion_tokens`, `max_output_tokens`) to what was left then; the
    gate notes the caller's value as `max_tokens_requested`. Replay reserves what the caller
    asked for, as live would now.
    """
    field = max_tokens_field(body)
    requested = saved.get("max_tokens_requested")
    if field is not None and whole_number(requested):
        body[field] = requested


def captured_usage(response: http.Response, prompt: int, model: str | None) -> Metered:
    """Usage from a captured answer: JSON, or SSE saved with `store_streamed_bodies`."""
    body = response.get_content(strict=False) or b""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        meter = StreamMeter(prompt, model)
        meter.feed(body)
        return meter.result()
    return meter_json(body, prompt, model)
