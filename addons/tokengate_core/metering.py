"""The Metering addon: what an admitted request cost, settled once through the quota service.

responseheaders: what the gate changed about the call goes on the answer's headers; a streamed
answer (SSE, or a JSON body mitmproxy streams) is followed event by event. response: usage
from the JSON body or the stream, settled; the provider's own error costs nothing. error: a
stream cut short is charged what streamed; a caller that hung up after the provider got the
request keeps what was reserved; nothing else is charged. A prompt count the provider reported
teaches the learned estimates (estimates.py).
"""

from __future__ import annotations

import logging

from mitmproxy import http

from . import answers, notes
from .estimates import counted_whole
from .gate import Gate
from .limiter import LimitStatus
from .notes import Notes
from .quota import Admission, QuotaService
from .streaming import StreamRelay, trailer_comment
from .usage import BodyMeter, Metered, StreamMeter, caller_hung_up, charge, meter_json

log = logging.getLogger("tokengate")

DEGRADED_HEADER = "X-TokenGate-Accounting"
LOWERED_HEADER = "X-TokenGate-Max-Tokens"  # the max_tokens the provider was sent, when lowered


class Metering:
    def __init__(self, gate: Gate, quota: QuotaService) -> None:
        self.gate = gate
        self.quota = quota
        self._meters: dict[str, StreamRelay | BodyMeter] = {}  # answers followed as they stream

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        note = notes.of(flow)
        if note is None or flow.response is None:
            return
        # What the gate changed about this call, so the caller can tell why.
        if note.get("accounting") == "degraded":
            flow.response.headers[DEGRADED_HEADER] = "degraded"
        if "max_tokens_lowered_to" in note:
            flow.response.headers[LOWERED_HEADER] = str(note["max_tokens_lowered_to"])
        admission = self.quota.holding(flow.id)
        if admission is None or flow.response.status_code >= 400:
            return
        is_sse = flow.response.headers.get("content-type", "").startswith("text/event-stream")
        if not (is_sse or flow.response.stream):
            return  # buffered: settled in `response`, with headers from the real usage
        # Headers leave before usage is known: they show the budget with this reservation.
        now = self.gate.clock()
        headers = answers.ratelimit_headers(admission.statuses, now, dialect=admission.dialect)
        answers.put_headers(flow.response, headers)
        meter = self._meters[flow.id] = self._meter(note, admission, is_sse)
        flow.response.stream = meter if is_sse else meter.passing

    def _meter(self, note: Notes, admission: Admission, is_sse: bool) -> StreamRelay | BodyMeter:
        dialect = admission.dialect
        prompt, model = note.get("prompt_estimate", 0), note.get("model")
        if not is_sse:
            # A JSON body can be streamed too (stream_large_bodies): metered whole at the end.
            return BodyMeter(dialect, prompt, model)
        reserved = admission.reservation.amounts
        return StreamRelay(
            StreamMeter(dialect.stream, prompt, model),
            drop_usage_chunk=bool(note.get("usage_injected")),
            trailer=lambda metered: trailer_comment(
                admission.statuses, reserved, metered, admission.cost(metered.usage)
            ),
        )

    def response(self, flow: http.HTTPFlow) -> None:
        admission = self.quota.holding(flow.id)
        if admission is None or flow.response is None:
            return
        note = notes.of(flow)
        meter = self._meters.pop(flow.id, None)
        status = flow.response.status_code
        metered = None if status >= 400 else self._measure(flow, note, admission, meter)
        charged = charge(status, metered, admission.reservation.amounts, False)
        statuses = self._settle(flow, note, admission, charged)
        if meter is None and metered is not None:
            headers = answers.ratelimit_headers(
                statuses, self.gate.clock(), dialect=admission.dialect
            )
            headers["X-Tokens-Consumed"] = str(metered.usage.total)
            if "cost_micro_usd" in note:
                headers[answers.COST_HEADER] = answers.dollars(note["cost_micro_usd"])
            answers.put_headers(flow.response, headers)

    def _measure(
        self,
        flow: http.HTTPFlow,
        note: Notes,
        admission: Admission,
        meter: StreamRelay | BodyMeter | None,
    ) -> Metered:
        if meter is not None:
            return meter.result()
        body = flow.response.get_content(strict=False)
        if body is None:
            # Streamed by another addon without a way for us to read it: charge the reservation.
            return Metered(admission.reservation.amounts, "estimated")
        return meter_json(
            admission.dialect, body, note.get("prompt_estimate", 0), note.get("model")
        )

    def error(self, flow: http.HTTPFlow) -> None:
        admission = self.quota.holding(flow.id)
        if admission is None:
            return
        meter = self._meters.pop(flow.id, None)
        streamed = meter.result() if meter is not None and meter.bytes_seen else None
        message = flow.error.msg if flow.error else ""
        sent = caller_hung_up(message) and flow.server_conn.timestamp_start is not None
        metered = charge(None, streamed, admission.reservation.amounts, sent)
        self._settle(flow, notes.of(flow), admission, metered)
        if metered is not None:
            log.info(
                "tokengate: flow %s cut short; charged %s tokens", flow.id, metered.usage.total
            )

    def _settle(
        self, flow: http.HTTPFlow, note: Notes, admission: Admission, metered: Metered | None
    ) -> tuple[LimitStatus, ...]:
        """Settle (None: release) and note the windows as they will stand and what the call
        cost, for the headers, the ledger and the comment."""
        statuses = self.quota.settle(flow.id, metered.usage if metered else None) or ()
        notes.note_windows(note, statuses)
        proxy = self.gate.proxy(note.get("proxy", ""))
        if proxy is not None:
            # Learned under the model admission corrects by: before the answer's model (an
            # unnamed Azure deployment's) takes its place in the notes.
            exact = counted_whole(flow.request, self.gate.exact_prompt_chars)
            estimate = note.get("prompt_estimate", 0)
            self.gate.estimates.answered(
                proxy.provider.name, note.get("model"), estimate, metered, exact
            )
        notes.note_usage(note, metered)
        cost = None if metered is None else admission.cost(metered.usage)
        if cost is not None:
            note["cost_micro_usd"] = cost
        return statuses
