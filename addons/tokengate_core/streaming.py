"""What the caller receives of a streamed (SSE) answer: every event as soon as it is whole.

The gate follows each event to meter the stream, drops the usage-only chunk when it was the gate
(not the caller) that asked the provider for it, and adds one SSE comment with the settled
figures where the dialect says the stream ends (before OpenAI's `data: [DONE]`, after the
Responses API's terminal event). SSE parsers skip comments, so no client breaks on the extra line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from . import answers
from .limiter import BUDGET, TOKEN_DIMENSIONS, LimitStatus, Usage, most_restrictive, settled_view
from .sse import EventFramer
from .usage import Metered, StreamMeter


def trailer_comment(
    statuses: tuple[LimitStatus, ...], reserved: Usage, metered: Metered, cost: int | None = None
) -> bytes:
    """`: x-ratelimit-remaining-tokens=N x-tokens-consumed=M`, N as if this flow had settled;
    then, where the model's price is known, `x-tokengate-cost=USD`, and where a budget applies
    what is left of the tightest one.

    The statuses are those taken when this flow was admitted, so N does not see other flows
    settled or admitted since; M is exact for this flow.
    """
    usage = metered.usage if cost is None else replace(metered.usage, cost=cost)
    after = settled_view(statuses, reserved, usage)
    tightest = most_restrictive(s for s in after if s.limit.dimension in TOKEN_DIMENSIONS)
    parts = [] if tightest is None else [f"x-ratelimit-remaining-tokens={tightest.remaining}"]
    parts.append(f"x-tokens-consumed={metered.usage.total}")
    if cost is not None:
        parts.append(f"x-tokengate-cost={answers.dollars(cost)}")
    budget = most_restrictive(s for s in after if s.limit.dimension == BUDGET)
    if budget is not None:
        parts.append(f"x-tokengate-budget-remaining={answers.dollars(budget.remaining)}")
    return f": {' '.join(parts)}\n\n".encode()


class StreamRelay:
    """The `flow.response.stream` callable of a governed SSE answer.

    Bytes of an event still incomplete are held back until its blank line arrives (a client
    cannot act on half an event anyway); everything else is passed on in the same call. It
    returns a list of chunks, empty when nothing is to be sent: mitmproxy would write an empty
    bytes chunk as `0\r\n\r\n`, which ends a chunked HTTP/1 body for the client.
    """

    def __init__(
        self, meter: StreamMeter, drop_usage_chunk: bool, trailer: Callable[[Metered], bytes]
    ) -> None:
        self.meter = meter
        self.drop_usage_chunk = drop_usage_chunk
        self.trailer = trailer
        self.framer = EventFramer()
        self.bytes_seen = 0  # from the provider, held back or not
        self._trailed = False

    def __call__(self, chunk: bytes) -> list[bytes]:
        self.bytes_seen += len(chunk)
        out = bytearray()
        for raw in self.framer.feed(chunk):
            out += self._relay(raw)
        if not chunk:
            self.meter.feed(b"")  # end of stream
        return [bytes(out)] if out else []

    def _relay(self, raw: bytes) -> bytes:
        followed = self.meter.feed(raw)
        if not followed:  # a comment, keep-alive or stray blank line
            return raw
        _, payload, ends = followed[-1]  # one whole raw event dispatches at most one event
        if self.drop_usage_chunk and self.meter.events.gate_only(payload):
            return b""
        if self._trailed or ends is None:
            return raw
        self._trailed = True
        trailer = self.trailer(self.meter.result())
        return trailer + raw if ends == "before" else raw + trailer

    def result(self) -> Metered:
        return self.meter.result()
