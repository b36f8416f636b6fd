"""Reserve before forwarding, settle on the real usage afterwards: the token books of the gate.

Each admitted flow holds one reservation from admission until it settles once: on the response
(real usage), on a stream cut short (what was streamed), on a caller hanging up after the
provider got the request (what was reserved), or is released when the provider answered an error
or nothing at all. The flow id keys the reservation, so a second settlement of the same flow
finds nothing and charges nothing.

A proxy with `queue_wait` lets a request that only in-flight reservations keep out wait for them
to settle (woken by this addon's own settlements, polling for other processes sharing a store)
instead of getting 429 at once; at most `tokengate_queue_limit` requests wait at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from mitmproxy import ctx, exceptions, http

from . import flowstate, responses, tokens
from .accounting import Accounting
from .config import Proxy
from .limiter import (
    Bucket,
    Decision,
    Demand,
    LimitStatus,
    Usage,
    held_back_by_reservations,
    settled_view,
)
from .settings import Gate
from .stores import Reservation, StoreUnavailable
from .streaming import StreamRelay, trailer_comment
from .usage import BodyMeter, BoundedBuffer, Metered, StreamMeter, meter_json, whole_number

log = logging.getLogger("tokengate")

MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
BAD_JSON = "We could not parse the JSON body of your request: expected a JSON object."
DEGRADED_HEADER = "X-TokenGate-Accounting"
LOWERED_HEADER = "X-TokenGate-Max-Tokens"  # the max_tokens the provider was sent, when lowered
STORE_RETRY_AFTER = 2  # seconds a caller is asked to wait while the store is down
# Bodies longer than this are parsed and tokenized off the event loop, so other flows keep
# moving (tiktoken releases the GIL while it encodes).
INLINE_TOKENIZE_BYTES = 20_000
# Streamed endpoints that report usage only when asked (`stream_options.include_usage`).
USAGE_ON_REQUEST_ENDPOINTS = ("chat/completions", "completions")
# Most completions one request is reserved for (`n`, `best_of`, prompts in a list): far above
# OpenAI's own maximum `n` (128); it only keeps the reserve of an absurd request bounded.
MAX_COMPLETIONS = 4096
# A waiting request re-checks this often even without a local settlement (shared stores).
QUEUE_POLL_SECONDS = 0.1
DEFAULT_QUEUE_LIMIT = 100


@dataclass
class InFlight:
    reservation: Reservation
    model: str | None
    prompt_estimate: int
    statuses: tuple[LimitStatus, ...]  # the windows with this reservation held
    meter: StreamRelay | BodyMeter | None = None


def buckets_for(proxy, key_name: str) -> tuple[Bucket, ...]:
    scope = key_name if proxy.scope == "key" else "*"
    return tuple(Bucket(f"{proxy.name}:{scope}:{limit.window}", limit) for limit in proxy.limits)


def max_tokens_field(body: dict[str, Any]) -> str | None:
    """The field by which the caller bounds the completion, if it set one."""
    for field in MAX_TOKEN_FIELDS:
        if whole_number(body.get(field)):
            return field
    return None


def _count_field(body: dict[str, Any], field: str) -> int:
    """A count the caller set (`n`, `best_of`), 1 if absent or invalid (the provider refuses it)."""
    value = body.get(field)
    return value if whole_number(value, 1) else 1


def completions_requested(body: dict[str, Any], endpoint: str) -> int:
    """How many completions the request can make the provider bill, each up to max tokens.

    chat/completions: `n`; completions: `best_of` (or `n`) per prompt, one per entry of a list
    `prompt` (texts or token lists; a flat list of token ids is one prompt). Capped at
    MAX_COMPLETIONS.
    """
    if endpoint == "chat/completions":
        count = _count_field(body, "n")
    elif endpoint == "completions":
        prompt = body.get("prompt")
        prompts = 1
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompts = len(prompt)
        count = prompts * max(_count_field(body, "n"), _count_field(body, "best_of"))
    else:
        count = 1
    return min(count, MAX_COMPLETIONS)


def completion_reserve(body: dict[str, Any], endpoint: str, default: int) -> int:
    """Max tokens (or the proxy's default) for every completion the request can produce."""
    if endpoint == "embeddings":
        return 0
    field = max_tokens_field(body)
    per_completion = default if field is None else body[field]
    return completions_requested(body, endpoint) * per_completion


def adjust_request(body: dict[str, Any], endpoint: str, reserved: Usage) -> dict[str, Any]:
    """Change `body` (in place) so the provider reports usage on a stream and cannot produce
    more than was reserved; the notes say what changed (empty: nothing, keep the body as is).

    A `max_tokens` above what is left of the budget (shared by the `n` completions) is lowered
    to it (at least 1), so a burst with `max_tokens` cannot overspend; the answer then ends with
    finish_reason `length`. The caller's own value is noted too, for replay and audit.
    """
    notes: dict[str, Any] = {}
    field = max_tokens_field(body)
    per_completion = reserved.completion // completions_requested(body, endpoint)
    if endpoint != "embeddings" and field is not None and body[field] > per_completion:
        notes["max_tokens_requested"] = body[field]
        body[field] = notes["max_tokens_lowered_to"] = max(1, per_completion)
    options = body.get("stream_options")
    if (
        endpoint in USAGE_ON_REQUEST_ENDPOINTS
        and body.get("stream") is True
        and (options is None or isinstance(options, dict))
        and (options or {}).get("include_usage") is not True
    ):
        body["stream_options"] = {**(options or {}), "include_usage": True}
        notes["usage_injected"] = True
    return notes


def prompt_estimate(body: dict[str, Any], endpoint: str, exact_chars: int) -> int | None:
    """None for a body nested too deeply to walk (as unreadable as bad JSON to the gate)."""
    try:
        return tokens.estimate_prompt(endpoint, body, exact_chars)
    except RecursionError:
        return None


def parse_and_estimate(
    raw: bytes, endpoint: str, exact_chars: int
) -> tuple[dict[str, Any] | None, int | None]:
    """The body as a JSON object and its prompt estimate; None for what the gate cannot read
    (not a JSON object, or nested too deeply to parse or to walk)."""
    body = json_object(raw)
    return body, None if body is None else prompt_estimate(body, endpoint, exact_chars)


async def read_request(
    raw: bytes, endpoint: str, exact_chars: int
) -> tuple[dict[str, Any] | None, int | None]:
    """`parse_and_estimate`, on a worker thread for a large body; for a small one on the event
    loop, once the model's encoding is built (off the loop, the first time)."""
    if len(raw) > INLINE_TOKENIZE_BYTES:
        return await asyncio.to_thread(parse_and_estimate, raw, endpoint, exact_chars)
    body = json_object(raw)
    if body is None:
        return None, None
    await tokens.load_for(tokens.model_of(body))
    return body, prompt_estimate(body, endpoint, exact_chars)


def json_object(raw: bytes) -> dict[str, Any] | None:
    """The request body as a JSON object; None if it is not one or nests too deeply to parse."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def usage_record(metered: Metered) -> dict[str, Any]:
    return {
        "prompt_tokens": metered.usage.prompt,
        "completion_tokens": metered.usage.completion,
        "total_tokens": metered.usage.total,
        "source": metered.source,
    }


def note_decision(
    state: dict[str, Any], decision: Decision, reservation: Reservation | None
) -> None:
    """What a reserve decided, for the ledger and the flow's comment: the limit that refused, or
    what was held."""
    note_windows(state, decision.statuses)
    if reservation is None:
        state["refused_by"] = decision.blocking.limit.name if decision.blocking else None
    else:
        state["reserved"] = {
            "prompt_tokens": reservation.amounts.prompt,
            "completion_tokens": reservation.amounts.completion,
        }


def note_windows(state: dict[str, Any], statuses: tuple[LimitStatus, ...] | None) -> None:
    """Each limit and what is left of it, for the ledger and the flow's comment.

    None (the store is down, the write waits) leaves the figures noted at admission.
    """
    if statuses is None:
        return
    state["limits"] = {status.limit.name: status.limit.count for status in statuses}
    state["remaining"] = {status.limit.name: status.remaining for status in statuses}


class Metering:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.accounting = Accounting(gate)
        self._inflight: dict[str, InFlight] = {}
        self._request_bodies: dict[str, BoundedBuffer] = {}
        self.queue_limit = DEFAULT_QUEUE_LIMIT
        self.waiting = 0  # requests waiting in the queue now

    def load(self, loader) -> None:
        loader.add_option(
            "tokengate_queue_limit",
            int,
            DEFAULT_QUEUE_LIMIT,
            "Most requests that wait at once for in-flight reservations (proxies with "
            "queue_wait); beyond it, requests get 429 at once.",
        )

    def configure(self, updated: set[str]) -> None:
        if "tokengate_queue_limit" in updated:
            if ctx.options.tokengate_queue_limit < 0:
                raise exceptions.OptionsError("tokengate_queue_limit must be 0 or more")
            self.queue_limit = ctx.options.tokengate_queue_limit

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
        endpoint = state["endpoint"]
        body, prompt = await read_request(raw, endpoint, self.gate.exact_prompt_chars)
        inflight = self._inflight.get(flow.id)
        if body is None or prompt is None:
            if inflight is None:  # not sent yet: refuse it rather than guess its cost
                flowstate.answer(flow, responses.invalid_request(400, BAD_JSON, None))
            return
        model = tokens.model_of(body)
        state.update(model=model, stream=body.get("stream") is True, prompt_estimate=prompt)
        if inflight is not None:  # admitted at requestheaders; now its estimate is known
            inflight.model, inflight.prompt_estimate = model, prompt
            return
        demand = Demand(prompt, completion_reserve(body, endpoint, proxy.completion_reserve))
        await self._admit(flow, state, proxy, demand)
        admitted = self._inflight.get(flow.id)
        if admitted is not None:
            notes = adjust_request(body, endpoint, admitted.reservation.amounts)
            if notes:
                # ASCII escapes: always valid JSON, even for a lone surrogate such as "\ud800".
                flow.request.content = json.dumps(body).encode()
                state.update(notes)

    async def _admit(self, flow: http.HTTPFlow, state: dict, proxy, demand: Demand) -> None:
        """Reserve across every limit of the caller's scope, or answer 429."""
        buckets = buckets_for(proxy, state["key"])
        if not buckets:
            return
        try:
            decision, reservation = await self.accounting.reserve(flow.id, buckets, demand)
            if reservation is None and proxy.queue_wait:
                decision, reservation = await self._queue(flow, buckets, demand, decision, proxy)
        except StoreUnavailable:
            if proxy.fail == "open":  # admitted unmetered; the response says so
                state["accounting"] = "degraded"
            else:
                flowstate.answer(flow, responses.store_unavailable(STORE_RETRY_AFTER))
            return
        note_decision(state, decision, reservation)
        if reservation is None:
            refusal = responses.rate_limited(decision, self.gate.clock(), proxy.name, demand.prompt)
            flowstate.answer(flow, refusal)
            return
        self._inflight[flow.id] = InFlight(
            reservation, state.get("model"), demand.prompt, decision.statuses
        )

    async def _queue(
        self,
        flow: http.HTTPFlow,
        buckets: tuple[Bucket, ...],
        demand: Demand,
        decision: Decision,
        proxy: Proxy,
    ) -> tuple[Decision, Reservation | None]:
        """Retry, up to the proxy's `queue_wait`, while only in-flight reservations refuse."""
        if self.waiting >= self.queue_limit:
            return decision, None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + proxy.queue_wait
        self.waiting += 1
        try:
            while held_back_by_reservations(decision, demand) and flow.client_conn.connected:
                left = deadline - loop.time()
                if left <= 0:
                    break
                await self.accounting.settlement(min(left, QUEUE_POLL_SECONDS))
                attempt, reservation = await self.accounting.reserve(flow.id, buckets, demand)
                if reservation is None:
                    decision = attempt  # the latest refusal, answered if the wait ends here
                elif flow.client_conn.connected:
                    return attempt, reservation
                else:
                    await self.accounting.settle(reservation, None)  # gone while it was admitted
                    break
        finally:
            self.waiting -= 1
        return decision, None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = flowstate.governed(flow)
        if state and flow.response is not None:
            # What the gate changed about this call, so the caller can tell why.
            if state.get("accounting") == "degraded":
                flow.response.headers[DEGRADED_HEADER] = "degraded"
            if "max_tokens_lowered_to" in state:
                flow.response.headers[LOWERED_HEADER] = str(state["max_tokens_lowered_to"])
        inflight = self._inflight.get(flow.id)
        if inflight is None or flow.response is None or flow.response.status_code >= 400:
            return
        is_sse = flow.response.headers.get("content-type", "").startswith("text/event-stream")
        if not (is_sse or flow.response.stream):
            return  # buffered: settled in `response`, with headers from the real usage
        # Headers leave before usage is known: they show the budget with this reservation.
        headers = responses.ratelimit_headers(inflight.statuses, self.gate.clock())
        responses.put_headers(flow.response, headers)
        if is_sse:
            state = flowstate.governed(flow) or {}
            inflight.meter = StreamRelay(
                StreamMeter(inflight.prompt_estimate, inflight.model),
                drop_usage_chunk=bool(state.get("usage_injected")),
                trailer=lambda metered: trailer_comment(
                    inflight.statuses, inflight.reservation.amounts, metered
                ),
            )
            flow.response.stream = inflight.meter
        else:
            # A JSON body can be streamed too (stream_large_bodies): metered whole at the end.
            inflight.meter = BodyMeter(inflight.prompt_estimate, inflight.model)
            flow.response.stream = inflight.meter.passing

    def response(self, flow: http.HTTPFlow) -> None:
        inflight = self._inflight.pop(flow.id, None)
        if inflight is None:
            return
        assert flow.response is not None
        state = flowstate.governed(flow)
        if flow.response.status_code >= 400:
            # The provider's own error passes unchanged and costs the caller nothing.
            self._settle(state, inflight, None)
            return
        metered = self._measure(flow, inflight)
        statuses = self._settle(state, inflight, metered)
        if inflight.meter is None:
            self._report(flow.response, statuses, metered)

    def _settle(
        self, state: dict[str, Any], inflight: InFlight, metered: Metered | None
    ) -> tuple[LimitStatus, ...]:
        """Hand the settlement (None: release) to the store without holding the answer, and
        note the windows as they will stand once it lands, seen from admission (other flows
        admitted or settled since are not in them): for the headers, the ledger and the comment.
        """
        reservation, usage = inflight.reservation, metered.usage if metered else None
        self.gate.writes.hand_over(lambda: self.accounting.settle(reservation, usage))
        statuses = settled_view(inflight.statuses, reservation.amounts, usage or Usage(0, 0))
        note_windows(state, statuses)
        state["usage"] = usage_record(metered) if metered else None
        return statuses

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

    def error(self, flow: http.HTTPFlow) -> None:
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
            self._settle(state, inflight, None)
            return
        self._settle(state, inflight, metered)
        log.info("tokengate: flow %s cut short; charged %s tokens", flow.id, metered.usage.total)


def caller_hung_up(flow: http.HTTPFlow) -> bool:
    """mitmproxy's words for a client that went away (HTTP/1 and HTTP/2)."""
    message = flow.error.msg if flow.error else ""
    return message.startswith(("Client disconnected", "stream reset by client"))
