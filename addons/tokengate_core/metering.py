"""Reserve before forwarding, settle on the real usage afterwards: the token books of the gate.

Each admitted flow holds one reservation from admission until it settles once: on the response
(real usage), on a stream cut short (what was streamed), on a caller hanging up after the
provider got the request (what was reserved), or is released when the provider answered an error
or nothing at all. The flow id keys the reservation, so a second settlement of the same flow
finds nothing and charges nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from mitmproxy import http

from . import flowstate, responses, tokens
from .limiter import Bucket, Demand, LimitStatus
from .settings import Gate
from .stores import Reservation
from .usage import BodyMeter, BoundedBuffer, Metered, StreamMeter, meter_json

log = logging.getLogger("tokengate")

MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
BAD_JSON = "We could not parse the JSON body of your request: expected a JSON object."
# Prompts longer than this are tokenized off the event loop, so other flows keep moving.
INLINE_TOKENIZE_BYTES = 20_000


@dataclass
class InFlight:
    reservation: Reservation
    model: str | None
    prompt_estimate: int
    statuses: tuple[LimitStatus, ...]  # the windows with this reservation held
    meter: StreamMeter | BodyMeter | None = None


def buckets_for(proxy, key_name: str) -> tuple[Bucket, ...]:
    scope = key_name if proxy.scope == "key" else "*"
    return tuple(Bucket(f"{proxy.name}:{scope}:{limit.name}", limit) for limit in proxy.limits)


def completion_reserve(body: dict[str, Any], endpoint: str, default: int) -> int:
    if endpoint == "embeddings":
        return 0
    for field in MAX_TOKEN_FIELDS:
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return default


async def estimate(endpoint: str, body: dict[str, Any], body_size: int) -> int:
    if body_size <= INLINE_TOKENIZE_BYTES:
        return tokens.estimate_prompt(endpoint, body)
    return await asyncio.to_thread(tokens.estimate_prompt, endpoint, body)


def json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def usage_record(metered: Metered) -> dict[str, Any]:
    return {
        "prompt_tokens": metered.usage.prompt,
        "completion_tokens": metered.usage.completion,
        "total_tokens": metered.usage.total,
        "source": metered.source,
    }


def note_windows(state: dict[str, Any], statuses: tuple[LimitStatus, ...]) -> None:
    """Each limit and what is left of it, for the ledger and the flow's comment."""
    state["limits"] = {status.limit.name: status.limit.count for status in statuses}
    state["remaining"] = {status.limit.name: status.remaining for status in statuses}


class Metering:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self._inflight: dict[str, InFlight] = {}
        self._request_bodies: dict[str, BoundedBuffer] = {}

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = flowstate.governed(flow)
        if state is None or flowstate.answered_by_gate(flow):
            return
        declared = flow.request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.gate.max_body:
            flowstate.answer(flow, responses.too_large(self.gate.max_body))
            return
        proxy = self.gate.proxy(state["proxy"])
        if state["endpoint"] is None or proxy is None:
            return
        # The gate must read what the provider sends, so it asks for it uncompressed.
        flow.request.headers["accept-encoding"] = "identity"
        if not self.gate.stream_request_bodies:
            flow.request.stream = False  # buffer: the whole body is estimated before it leaves
            return
        # With stream_large_bodies set, mitmproxy may send the body upstream before `request`
        # runs, so the gate decides now, on what is left, and reads the body on its way.
        await self._admit(flow, state, proxy, Demand(0, proxy.completion_reserve))
        if flowstate.answered_by_gate(flow):
            flow.request.stream = False
            return
        body = self._request_bodies[flow.id] = BoundedBuffer(self.gate.max_body)
        flow.request.stream = body.passing

    async def request(self, flow: http.HTTPFlow) -> None:
        state = flowstate.governed(flow)
        if state is None or flowstate.answered_by_gate(flow) or state["endpoint"] is None:
            return
        proxy = self.gate.proxy(state["proxy"])
        if proxy is None:
            return
        streamed = self._request_bodies.pop(flow.id, None)
        raw = streamed.data if streamed else flow.request.get_content(strict=False) or b""
        if streamed is None and len(raw) > self.gate.max_body:  # chunked, no content-length
            flowstate.answer(flow, responses.too_large(self.gate.max_body))
            return
        body = json_object(raw)
        inflight = self._inflight.get(flow.id)
        if body is None:
            if inflight is None:  # not sent yet: refuse it rather than guess its cost
                flowstate.answer(flow, responses.invalid_request(400, BAD_JSON, None))
            return
        endpoint = state["endpoint"]
        model = body.get("model") if isinstance(body.get("model"), str) else None
        prompt = await estimate(endpoint, body, len(raw))
        state.update(model=model, stream=body.get("stream") is True, prompt_estimate=prompt)
        if inflight is not None:  # admitted at requestheaders; now its estimate is known
            inflight.model, inflight.prompt_estimate = model, prompt
            return
        demand = Demand(prompt, completion_reserve(body, endpoint, proxy.completion_reserve))
        await self._admit(flow, state, proxy, demand)

    async def _admit(self, flow: http.HTTPFlow, state: dict, proxy, demand: Demand) -> None:
        """Reserve across every limit of the caller's scope, or answer 429."""
        buckets = buckets_for(proxy, state["key"])
        if not buckets:
            return
        decision, reservation = await self.gate.store.reserve(flow.id, buckets, demand)
        note_windows(state, decision.statuses)
        if reservation is None:
            refusal = responses.rate_limited(decision, self.gate.clock(), proxy.name, demand.prompt)
            flowstate.answer(flow, refusal)
            state["refused_by"] = decision.blocking.limit.name if decision.blocking else None
            return
        self._inflight[flow.id] = InFlight(
            reservation, state.get("model"), demand.prompt, decision.statuses
        )
        state["reserved"] = {
            "prompt_tokens": reservation.amounts.prompt,
            "completion_tokens": reservation.amounts.completion,
        }

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        inflight = self._inflight.get(flow.id)
        if inflight is None or flow.response is None or flow.response.status_code >= 400:
            return
        is_sse = flow.response.headers.get("content-type", "").startswith("text/event-stream")
        if not (is_sse or flow.response.stream):
            return  # buffered: settled in `response`, with headers from the real usage
        # Headers leave before usage is known: they show the budget with this reservation.
        headers = responses.ratelimit_headers(inflight.statuses, self.gate.clock())
        responses.put_headers(flow.response, headers)
        # A JSON body can be streamed too (stream_large_bodies); it is metered whole at the end.
        meter_class = StreamMeter if is_sse else BodyMeter
        inflight.meter = meter_class(inflight.prompt_estimate, inflight.model)
        flow.response.stream = self._follow(inflight.meter)

    @staticmethod
    def _follow(meter: StreamMeter | BodyMeter):
        def on_chunk(chunk: bytes) -> bytes:
            meter.feed(chunk)
            return chunk

        return on_chunk

    async def response(self, flow: http.HTTPFlow) -> None:
        inflight = self._inflight.pop(flow.id, None)
        if inflight is None:
            return
        assert flow.response is not None
        state = flowstate.governed(flow)
        if flow.response.status_code >= 400:
            # The provider's own error passes unchanged and costs the caller nothing.
            note_windows(state, await self.gate.store.release(inflight.reservation))
            state["usage"] = None
            return
        metered = self._measure(flow, inflight)
        statuses = await self.gate.store.settle(inflight.reservation, metered.usage)
        note_windows(state, statuses)
        state["usage"] = usage_record(metered)
        if inflight.meter is None:
            self._report(flow.response, statuses, metered)

    def _measure(self, flow: http.HTTPFlow, inflight: InFlight) -> Metered:
        if inflight.meter is not None:
            return inflight.meter.result()
        body = flow.response.get_content(strict=False) if flow.response else None
        if body is None:
            # Streamed by another addon without a way for us to read it: charge the reservation.
            return Metered(inflight.reservation.amounts, "estimated")
        return meter_json(body, inflight.prompt_estimate, inflight.model)

    def _report(
        self, response: http.Response, statuses: tuple[LimitStatus, ...], metered: Metered
    ) -> None:
        headers = responses.ratelimit_headers(statuses, self.gate.clock())
        headers["X-Tokens-Consumed"] = str(metered.usage.total)
        responses.put_headers(response, headers)

    async def error(self, flow: http.HTTPFlow) -> None:
        self._request_bodies.pop(flow.id, None)
        inflight = self._inflight.pop(flow.id, None)
        if inflight is None:
            return
        state = flowstate.governed(flow)
        meter = inflight.meter
        if meter is not None and meter.bytes_seen:
            metered = meter.result()  # cut short: what was streamed
        elif caller_hung_up(flow) and flow.server_conn.timestamp_start is not None:
            # The provider got the request and may be billing for it: hanging up must not
            # make a request free, so the caller keeps what was reserved.
            metered = Metered(inflight.reservation.amounts, "estimated")
        else:
            # The provider failed before answering anything: nothing to charge.
            note_windows(state, await self.gate.store.release(inflight.reservation))
            state["usage"] = None
            return
        note_windows(state, await self.gate.store.settle(inflight.reservation, metered.usage))
        state["usage"] = usage_record(metered)
        log.info("tokengate: flow %s cut short; charged %s tokens", flow.id, metered.usage.total)


def caller_hung_up(flow: http.HTTPFlow) -> bool:
    """mitmproxy's words for a client that went away (HTTP/1 and HTTP/2)."""
    message = flow.error.msg if flow.error else ""
    return message.startswith(("Client disconnected", "stream reset by client"))
