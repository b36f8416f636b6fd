"""What a response cost: the provider's reported usage, or a tokenizer count of what it sent.

Providers report usage in the JSON body or in a stream's events, each API in its own shape (the
dialect reads it). Where they report nothing, or nothing believable, the gate counts the
generated text itself and marks the figure `estimated`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from . import tokens
from .dialects import Dialect, StreamEvents
from .limiter import Usage
from .sse import Event, SSEParser


@dataclass(frozen=True)
class Metered:
    usage: Usage
    source: str  # "reported" or "estimated"
    model: str | None = None  # the model the answer named, if it named one


def json_payload(data: str | bytes) -> Any:
    """The parsed JSON; None for anything the gate cannot parse, nesting too deep included."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def meter_json(dialect: Dialect, body: bytes, prompt_estimate: int, model: str | None) -> Metered:
    """Usage of a complete (non-streamed) JSON response."""
    payload = json_payload(body)
    reported, answered = dialect.usage(payload), dialect.model(payload)
    if reported is not None:
        return Metered(reported, "reported", answered)
    completion = tokens.count_text(dialect.text(payload), model)
    return Metered(Usage(prompt_estimate, completion), "estimated", answered)


def charge(
    status: int | None, metered: Metered | None, reserved: Usage, sent_then_hung_up: bool
) -> Metered | None:
    """What a request that was admitted costs, once its answer (or its end) is known; None
    releases the reservation.

    A provider's error status costs nothing. Without an answer: what was streamed before the
    cut (`metered`), else the reservation if the provider got the request and the caller hung
    up (it may be billing for it: hanging up must not make a request free), else nothing (the
    provider failed before answering).
    """
    if status is not None:
        return None if status >= 400 else metered
    if metered is not None:
        return metered
    if sent_then_hung_up:
        return Metered(reserved, "estimated")
    return None


def caller_hung_up(error_message: str) -> bool:
    """mitmproxy's words for a client that went away (HTTP/1 and HTTP/2)."""
    return error_message.startswith(("Client disconnected", "stream reset by client"))


class StreamMeter:
    """Follows an SSE stream chunk by chunk and knows, at any point, what it has cost so far."""

    def __init__(self, events: StreamEvents, prompt_estimate: int, model: str | None) -> None:
        self.events = events
        self.prompt_estimate = prompt_estimate
        self.model = model
        self.parser = SSEParser()
        self.reported: Usage | None = None
        self.answered: str | None = None  # the model the stream names
        self.final = False  # the reported usage is the whole answer's (not only its prompt)
        self._text: list[str] = []
        self._result: Metered | None = None  # what result() computed, until more arrives
        self.bytes_seen = 0
        self.done = False  # saw the dialect's end of stream

    def feed(self, chunk: bytes) -> list[tuple[Event, Any, str | None]]:
        """Follow `chunk`; the events it completed, each with its JSON payload (None if not
        JSON) and where it ends the stream ('before'/'after' the trailer, None: it does not)."""
        self.bytes_seen += len(chunk)
        followed = []
        for event in self.parser.feed(chunk):
            payload = json_payload(event.data)
            ends = self.events.ends(event.data, payload)
            self._event(payload, ends)
            followed.append((event, payload, ends))
        return followed

    def _event(self, payload: Any, ends: str | None) -> None:
        if self.answered is None and (answered := self.events.model(payload)):
            self.answered = answered
            self._result = None
        usage = self.events.usage(payload, self.reported)
        if usage is not self.reported:
            self.reported = usage
            self.final = self.events.final(payload)
            self._result = None
        if ends:
            self.done = True
            return
        text = self.events.text(payload)
        if text:
            self._text.append(text)
            self._result = None

    def result(self) -> Metered:
        """Computed once for the trailer and reused at settlement: counting all the streamed
        text runs on the event loop."""
        if self._result is None:
            self._result = self._compute()
        return self._result

    def _compute(self) -> Metered:
        reported = self.reported
        if reported is not None and self.final:
            return Metered(reported, "reported", self.answered)
        completion = tokens.count_text("".join(self._text), self.model)
        if reported is None:
            return Metered(Usage(self.prompt_estimate, completion), "estimated", self.answered)
        # Cut before the answer's usage came: the prompt as reported, what streamed counted.
        return Metered(
            replace(reported, completion=completion, reasoning=0), "estimated", self.answered
        )


class BoundedBuffer:
    """Keeps the bytes of a body passing through, up to a bound; `passing` is the stream hook."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._data = bytearray()
        self.bytes_seen = 0

    @property
    def overflowed(self) -> bool:
        return self.bytes_seen > self.limit

    @property
    def data(self) -> bytes:
        return b"" if self.overflowed else bytes(self._data)

    def feed(self, chunk: bytes) -> None:
        self.bytes_seen += len(chunk)
        if not self.overflowed:
            self._data += chunk

    def passing(self, chunk: bytes) -> bytes:
        self.feed(chunk)
        return chunk


class BodyMeter(BoundedBuffer):
    """A JSON response that is streamed through (stream_large_bodies), metered whole at its end.

    Beyond the bound the body is not kept and the completion cannot be counted: only the prompt
    estimate is charged then (no JSON answer of that size carries a completion).
    """

    MAX_BYTES = 64 * 1024 * 1024

    def __init__(self, dialect: Dialect, prompt_estimate: int, model: str | None) -> None:
        super().__init__(self.MAX_BYTES)
        self.dialect = dialect
        self.prompt_estimate = prompt_estimate
        self.model = model

    def result(self) -> Metered:
        return meter_json(self.dialect, self.data, self.prompt_estimate, self.model)
