"""Reserve before forwarding, settle on the real usage afterwards: the token books of the gate.

Each admitted flow holds one reservation from `request` until it settles once (response), is
released (the provider answered an error, or the request never got an answer), or is charged
for what was streamed (a stream cut short). The flow id keys the reservation, so a second
settlement of the same flow finds nothing and charges nothing.
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
from .usage import Metered, StreamMeter, meter_json

log = logging.getLogger("tokengate")

MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# Prompts longer than this are tokenized off the event loop, so other flows keep moving.
INLINE_TOKENIZE_CHARS = 20_000


@dataclass
class InFlight:
    reservation: Reservation
    model: str | None
    prompt_estimate: int
    meter: StreamMeter | None = None


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


async def estimate(endpoint: str, body: dict[str, Any]) -> int:
    if len(json.dumps(body)) <= INLINE_TOKENIZE_CHARS:
        return tokens.estimate_prompt(endpoint, body)
    return await asyncio.to_thread(tokens.estimate_prompt, endpoint, body)


def _usage_record(metered: Metered) -> dict[str, Any]:
    return {
        "prompt_tokens": metered.usage.prompt,
        "completion_tokens": metered.usage.completion,
        "total_tokens": metered.usage.total,
        "source": metered.source,
    }


class Metering:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self._inflight: dict[str, InFlight] = {}

    async def request(self, flow: http.HTTPFlow) -> None:
        state = flowstate.governed(flow)
        if state is None or flowstate.answered_by_gate(flow) or state["endpoint"] is None:
            return
        proxy = self.gate.proxy(state["proxy"])
        if proxy is None:
            return
        try:
            body = json.loads(flow.request.get_content(strict=False) or b"")
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            flowstate.answer(
                flow,
                responses.gate_response(
                    400,
                    "We could not parse the JSON body of your request: expected a JSON object.",
                    "invalid_request_error",
                    None,
                ),
            )
            return
        endpoint = state["endpoint"]
        model = body.get("model") if isinstance(body.get("model"), str) else None
        prompt = await estimate(endpoint, body)
        demand = Demand(prompt, completion_reserve(body, endpoint, proxy.completion_reserve))
        state.update(model=model, stream=body.get("stream") is True, prompt_estimate=prompt)
        # The gate must read what the provider sends, so it asks for it uncompressed.
        flow.request.headers["accept-encoding"] = "identity"
        buckets = buckets_for(proxy, state["key"])
        if not buckets:
            return
        decision, reservation = await self.gate.store.reserve(flow.id, buckets, demand)
        now = self.gate.clock()
        if reservation is None:
            flowstate.answer(flow, responses.rate_limited(decision, now, proxy.name, demand.prompt))
            state["refused_by"] = decision.blocking.limit.name if decision.blocking else None
            return
        self._inflight[flow.id] = InFlight(reservation, model, prompt)
        state["reserved"] = {
            "prompt_tokens": reservation.amounts.prompt,
            "completion_tokens": reservation.amounts.completion,
        }
        state["headers"] = responses.ratelimit_headers(decision.statuses, now)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        inflight = self._inflight.get(flow.id)
        if inflight is None or flow.response is None or flow.response.status_code >= 400:
            return
        content_type = flow.response.headers.get("content-type", "")
        if flow.response.stream or content_type.startswith("text/event-stream"):
            # Headers leave before usage is known: they show the budget with this reservation.
            flow.response.headers.update(flowstate.governed(flow)["headers"])
            inflight.meter = StreamMeter(inflight.prompt_estimate, inflight.model)
            flow.response.stream = self._follow(inflight.meter)

    @staticmethod
    def _follow(meter: StreamMeter):
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
            await self.gate.store.release(inflight.reservation)
            state["usage"] = None
            return
        metered = self._measure(flow, inflight)
        statuses = await self.gate.store.settle(inflight.reservation, metered.usage)
        state["usage"] = _usage_record(metered)
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
        response.headers.update(responses.ratelimit_headers(statuses, self.gate.clock()))
        response.headers["X-Tokens-Consumed"] = str(metered.usage.total)

    async def error(self, flow: http.HTTPFlow) -> None:
        inflight = self._inflight.pop(flow.id, None)
        if inflight is None:
            return
        state = flowstate.governed(flow)
        meter = inflight.meter
        if meter is None or meter.bytes_seen == 0:
            # Nothing reached the caller: the request cost nothing we can see.
            await self.gate.store.release(inflight.reservation)
            state["usage"] = None
            return
        metered = meter.result()
        await self.gate.store.settle(inflight.reservation, metered.usage)
        state["usage"] = _usage_record(metered)
        log.info("tokengate: flow %s cut short; charged %s tokens", flow.id, metered.usage.total)
