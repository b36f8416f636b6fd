"""What a response cost: the provider's reported usage, or a tokenizer count of what it sent.

Providers report usage in the JSON body (`usage` of chat/completions/embeddings, Responses API
`input_tokens`/`output_tokens`) or in a stream's final event. Where they report nothing, or
nothing believable, the gate counts the generated text itself and marks the figure `estimated`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import tokens
from .limiter import Usage
from .sse import Event, SSEParser

# A reported figure above this is not believed (no model produces ten million tokens at once).
MAX_BELIEVABLE_TOKENS = 10_000_000


@dataclass(frozen=True)
class Metered:
    usage: Usage
    source: str  # "reported" or "estimated"


def whole_number(value: Any, minimum: int = 0) -> bool:
    """A JSON integer >= minimum (JSON's true/false are not counts, though Python's bool is int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _count(value: Any) -> int | None:
    return value if whole_number(value) and value <= MAX_BELIEVABLE_TOKENS else None


def reported_usage(payload: Any) -> Usage | None:
    """`usage` as chat/completions/embeddings or the Responses API report it; None if absent."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        response = payload.get("response")  # Responses API stream events wrap the response
        return reported_usage(response) if isinstance(response, dict) else None
    prompt = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
    completion = _count(usage.get("completion_tokens", usage.get("output_tokens", 0)))
    if prompt is None or completion is None:
        return None
    return Usage(prompt, completion)


def generated_text(payload: Any) -> str:
    """The text a JSON response or stream event carries, for counting when usage is missing."""
    if not isinstance(payload, dict):
        return ""
    parts: list[str] = []
    for choice in payload.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        for holder in (choice.get("message"), choice.get("delta")):
            if isinstance(holder, dict):
                for key in ("content", "refusal", "reasoning_content"):
                    if isinstance(holder.get(key), str):
                        parts.append(holder[key])
                for call in holder.get("tool_calls") or ():
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                        parts.append(function["arguments"])
        if isinstance(choice.get("text"), str):
            parts.append(choice["text"])
    kind = payload.get("type")
    if isinstance(kind, str) and kind.endswith(".delta") and isinstance(payload.get("delta"), str):
        parts.append(payload["delta"])
    for item in payload.get("output") or ():
        if isinstance(item, dict):
            for content in item.get("content") or ():
                if isinstance(content, dict) and isinstance(content.get("text"), str):
                    parts.append(content["text"])
            if isinstance(item.get("arguments"), str):
                parts.append(item["arguments"])
    return "".join(parts)


def json_payload(data: str | bytes) -> Any:
    """The parsed JSON; None for anything the gate cannot parse, nesting too deep included."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def meter_json(body: bytes, prompt_estimate: int, model: str | None) -> Metered:
    """Usage of a complete (non-streamed) JSON response."""
    payload = json_payload(body)
    reported = reported_usage(payload)
    if reported is not None:
        return Metered(reported, "reported")
    completion = tokens.count_text(generated_text(payload), model)
    return Metered(Usage(prompt_estimate, completion), "estimated")


# The Responses API ends a stream with one of these (it sends no `[DONE]`); each carries usage.
TERMINAL_RESPONSE_EVENTS = ("response.completed", "response.failed", "response.incomplete")


def is_done(data: str) -> bool:
    return data.strip() == "[DONE]"


def is_terminal_response_event(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("type") in TERMINAL_RESPONSE_EVENTS


def is_usage_only_chunk(payload: Any) -> bool:
    """The extra chat/completions chunk `stream_options.include_usage` asks for: no choices, a
    usage object. (Other chunks without choices, e.g. Azure's prompt filter results with
    `"usage": null`, are the caller's.)"""
    return (
        isinstance(payload, dict)
        and payload.get("choices") == []
        and isinstance(payload.get("usage"), dict)
    )


class StreamMeter:
    """Follows an SSE stream chunk by chunk and knows, at any point, what it has cost so far."""

    def __init__(self, prompt_estimate: int, model: str | None) -> None:
        self.prompt_estimate = prompt_estimate
        self.model = model
        self.parser = SSEParser()
        self.reported: Usage | None = None
        self._text: list[str] = []
        self._result: Metered | None = None  # what result() computed, until more arrives
        self.bytes_seen = 0
        self.done = False  # saw `[DONE]` or a terminal Responses API event

    def feed(self, chunk: bytes) -> list[tuple[Event, Any]]:
        """Follow `chunk`; the events it completed with their JSON payloads (None if not JSON)."""
        self.bytes_seen += len(chunk)
        followed = []
        for event in self.parser.feed(chunk):
            payload = None if is_done(event.data) else json_payload(event.data)
            self._event(event.data, payload)
            followed.append((event, payload))
        return followed

    def _event(self, data: str, payload: Any) -> None:
        if is_done(data):
            self.done = True
            return
        usage = reported_usage(payload)
        if usage is not None:
            self.reported = usage
            self._result = None
        if is_terminal_response_event(payload):
            self.done = True
            return
        text = generated_text(payload)
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
        if self.reported is not None:
            return Metered(self.reported, "reported")
        completion = tokens.count_text("".join(self._text), self.model)
        return Metered(Usage(self.prompt_estimate, completion), "estimated")


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

    def __init__(self, prompt_estimate: int, model: str | None) -> None:
        super().__init__(self.MAX_BYTES)
        self.prompt_estimate = prompt_estimate
        self.model = model

    def result(self) -> Metered:
        return meter_json(self.data, self.prompt_estimate, self.model)
