"""The bundled mock's Anthropic Messages API: `POST /v1/messages` (JSON and SSE, with prompt
cache figures, tool use, `max_tokens` honoured), `POST /v1/messages/count_tokens`, and the model
list in Anthropic's shape for callers that send `anthropic-version`.

The provider key is expected in `x-api-key` (or as a Bearer token), as Anthropic takes it. The
X-Mock-* modes of the OpenAI mock apply (errors, missing or broken usage, cut, split, slow, drip,
reset, hang, key echo), with errors, its own 429 included, in Anthropic's shape and headers.

Its prompt count is its own rule, not the gate's estimate (a gate never sees the provider's
tokenizer): every text (system, message blocks, tool definitions as JSON) counted in cl100k_base,
times 1.25 rounded up, plus 4 per message and 7 per request; an image or PDF half the gate's bound
for it. Prompt caching as Anthropic does it: the part of the prompt up to the last block marked
`cache_control` (tools, then system, then messages) is written to the cache the first time
(`cache_creation_input_tokens`) and read from it afterwards (`cache_read_input_tokens`);
`input_tokens` is the rest.
"""

from __future__ import annotations

import hashlib
import math
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from tokengate_core import tokens
from tokengate_core.dialects.anthropic import content_parts
from tokengate_core.tools.mock import (
    ERROR_MODE,
    USAGE_FAULTS,
    Completion,
    Event,
    Mode,
    _dumps,
    completion_pieces,
    render,
)

MESSAGES = "messages"
COUNT_TOKENS = "messages/count_tokens"
MODELS = ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1")
MODELS_CREATED = "2025-01-01T00:00:00Z"
MAX_TOKENS = 64_000  # the mock refuses (400) a larger max_tokens, as Claude's models do
TEXT_FACTOR = 1.25
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REQUEST = 7
ENCODING = "cl100k_base"
# Events before the first text delta: message_start, content_block_start, ping.
FIRST_PIECE = 3
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
RATE_LIMIT_HEADERS = (
    ("retry-after", "7"),
    ("anthropic-ratelimit-tokens-limit", "30000"),
    ("anthropic-ratelimit-tokens-remaining", "0"),
    ("anthropic-ratelimit-tokens-reset", "2026-01-01T00:00:07Z"),
    ("anthropic-ratelimit-requests-limit", "50"),
    ("anthropic-ratelimit-requests-remaining", "0"),
    ("anthropic-ratelimit-requests-reset", "2026-01-01T00:00:07Z"),
)

_cache: set[str] = set()  # prompt prefixes written to the "cache"
_cache_lock = threading.Lock()


def endpoint_of(path: str) -> str:
    return path.strip("/").removeprefix("v1/")


def serves(path: str, headers: Any) -> bool:
    """Requests this module answers: the messages endpoints, and the model list when the
    caller speaks Anthropic (its SDKs and Claude Code send `anthropic-version`)."""
    name = endpoint_of(path)
    if name in (MESSAGES, COUNT_TOKENS):
        return True
    return name.split("/")[0] == "models" and "anthropic-version" in headers


def _listed(value: Any) -> list:
    return value if isinstance(value, list) else []


def _blocks(body: dict) -> Iterator[tuple[Any, bool]]:
    """(content, marked for caching) for each prompt block in cache order: tools, system,
    messages."""
    for tool in _listed(body.get("tools")):
        yield _dumps(tool), isinstance(tool, dict) and "cache_control" in tool
    for holder in (body.get("system"), *_listed(body.get("messages"))):
        content = holder.get("content") if isinstance(holder, dict) else holder
        if isinstance(content, list):
            for block in content:
                yield block, isinstance(block, dict) and "cache_control" in block
        elif content is not None:
            yield content, False


def _count(value: Any) -> float:
    texts, media = content_parts(value)
    encoding = tokens.get_encoding(ENCODING)
    return sum(len(encoding.encode(t, disallowed_special=())) for t in texts) * TEXT_FACTOR + (
        media / 2
    )


def billed_prompt(body: dict) -> tuple[int, int]:
    """(prompt tokens, of which the cached prefix) by the mock's own rule (module docstring)."""
    fixed = TOKENS_PER_REQUEST + TOKENS_PER_MESSAGE * len(_listed(body.get("messages")))
    total, cached = 0.0, 0.0
    for content, marked in _blocks(body):
        total += _count(content)
        if marked:
            cached = total
    return math.ceil(total) + fixed, math.ceil(cached)


def _cache_split(body: dict, cached: int) -> tuple[int, int]:
    """(cache writes, cache reads) of this request's cached prefix: read when an earlier
    request wrote the same prefix (up to its last `cache_control` block), written otherwise."""
    if not cached:
        return 0, 0
    blocks = list(_blocks(body))
    last = max(index for index, (_, marked) in enumerate(blocks) if marked)
    prefix = _dumps([content for content, _ in blocks[: last + 1]])
    digest = hashlib.sha256(prefix.encode()).hexdigest()
    with _cache_lock:
        seen = digest in _cache
        _cache.add(digest)
    return (0, cached) if seen else (cached, 0)


def _tool_named(body: dict) -> str | None:
    """The tool the caller made the model call (`tool_choice` any or tool), if any."""
    choice, tools = body.get("tool_choice"), body.get("tools")
    if not (isinstance(choice, dict) and isinstance(tools, list) and tools):
        return None
    if choice.get("type") == "tool" and isinstance(choice.get("name"), str):
        return choice["name"]
    first = tools[0]
    if choice.get("type") == "any" and isinstance(first, dict):
        return first.get("name") if isinstance(first.get("name"), str) else None
    return None


class Message:
    """One generated answer in the Messages API's shape (JSON or events)."""

    def __init__(self, completion: Completion, tool: str | None, cache: tuple[int, int]) -> None:
        self.completion = completion
        self.tool = tool
        self.cache_write, self.cache_read = cache
        self.id = "msg_" + uuid.uuid4().hex[:24]

    def _figure(self, count: int) -> Any:
        fault = self.completion.usage_fault
        return USAGE_FAULTS[fault](count) if fault else count

    def usage(self, output: int) -> dict:
        fresh = self.completion.prompt_tokens - self.cache_write - self.cache_read
        return {
            "input_tokens": self._figure(fresh),
            "cache_creation_input_tokens": self._figure(self.cache_write),
            "cache_read_input_tokens": self._figure(self.cache_read),
            "output_tokens": self._figure(output),
        }

    @property
    def stop_reason(self) -> str:
        if self.completion.finish_reason == "length":
            return "max_tokens"
        return "tool_use" if self.tool else "end_turn"

    def _head(self, content: list) -> dict:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.completion.model,
            "content": content,
        }

    def _tool_block(self, arguments: dict | None) -> dict:
        tool_id = "toolu_" + self.id[4:]
        return {"type": "tool_use", "id": tool_id, "name": self.tool, "input": arguments}

    def json(self) -> dict:
        text = self.completion.text
        block = self._tool_block({"text": text}) if self.tool else {"type": "text", "text": text}
        reply = self._head([block]) | {"stop_reason": self.stop_reason, "stop_sequence": None}
        if self.completion.report_usage:
            reply["usage"] = self.usage(self.completion.completion_tokens)
        return reply

    def events(self) -> list[Event]:
        report = self.completion.report_usage
        start = self._head([]) | {"stop_reason": None, "stop_sequence": None}
        if report:
            start["usage"] = self.usage(1)  # Anthropic's placeholder output count
        if self.tool:
            first = self._tool_block({})
            arguments = _dumps({"text": self.completion.text})
            size = max(1, -(-len(arguments) // len(self.completion.pieces or [""])))
            pieces = [arguments[i : i + size] for i in range(0, len(arguments), size)]
            deltas = [{"type": "input_json_delta", "partial_json": p} for p in pieces]
        else:
            first = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": p} for p in self.completion.pieces]
        stop = {"type": "message_delta", "delta": {"stop_reason": self.stop_reason}}
        stop["delta"]["stop_sequence"] = None
        if report:
            stop["usage"] = {"output_tokens": self._figure(self.completion.completion_tokens)}
        data = [
            {"type": "message_start", "message": start},
            {"type": "content_block_start", "index": 0, "content_block": first},
            {"type": "ping"},
            *({"type": "content_block_delta", "index": 0, "delta": d} for d in deltas),
            {"type": "content_block_stop", "index": 0},
            stop,
            {"type": "message_stop"},
        ]
        return [(item["type"], _dumps(item)) for item in data]


def error_body(status: int, message: str) -> dict:
    kind = ERROR_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def models_reply(name: str) -> tuple[int, dict]:
    def model(model_id: str) -> dict:
        display = model_id.replace("-", " ").title()
        return {"type": "model", "id": model_id, "display_name": display} | {
            "created_at": MODELS_CREATED
        }

    wanted = name.removeprefix("models").strip("/")
    if not wanted:
        data = [model(m) for m in MODELS]
        return 200, {"data": data, "has_more": False, "first_id": MODELS[0], "last_id": MODELS[-1]}
    if wanted in MODELS:
        return 200, model(wanted)
    return 404, error_body(404, f"model: {wanted}")


class Answering:
    """Answers one Anthropic request on a mock handler (its sending and fault helpers)."""

    def __init__(self, handler: Any, raw: bytes, body: Any) -> None:
        self.handler = handler
        self.server = handler.server
        self.raw = raw
        self.body = body
        self.tag = handler.headers.get("X-Mock-Tag", "-")

    def key_received(self) -> str:
        """The key in `x-api-key`, or else as a Bearer token (the Python SDK's form)."""
        headers = self.handler.headers
        return headers.get("x-api-key") or headers.get("Authorization", "").removeprefix("Bearer ")

    def error(self, status: int, message: str, *extra: tuple[str, str]) -> None:
        if status == 429:
            extra = (*RATE_LIMIT_HEADERS, *extra)
        self.handler._send_json(status, error_body(status, message), *extra)

    def run(self) -> None:
        handler = self.handler
        name = endpoint_of(handler._path)
        expected = self.server.expect_key
        authorized = expected is None or self.key_received() == expected
        endpoint = name if name in (MESSAGES, COUNT_TOKENS) else None
        self.server.stats.record(handler._path, endpoint, handler.headers, self.body, authorized)
        self.server.write_record(handler.command, handler.path, handler.headers, self.raw)
        if not authorized:
            self.error(401, "invalid x-api-key")
        elif handler.command == "GET" and endpoint is None:
            handler._send_json(*models_reply(name))
        elif endpoint is None or handler.command != "POST":
            self.error(404, f"Not found: {handler.command} {handler._path}")
        else:
            try:
                mode = Mode.from_headers(handler.headers, self.server.mode)
            except ValueError as e:
                self.error(400, str(e))
                return
            self.generate(endpoint, mode)

    def generate(self, endpoint: str, mode: Mode) -> None:
        handler, body = self.handler, self.body
        if ERROR_MODE.fullmatch(mode.name):
            self.error(mode.error_status, f"Mock provider error ({mode.name})")
        elif mode.name == "echo-key":
            self.echo_key(mode)
        elif mode.name == "reset":
            handler._reset()
        elif mode.name == "hang":
            handler._hang(mode)
        elif not isinstance(body, dict):
            self.error(400, "The request body is not valid JSON.")
        elif endpoint == COUNT_TOKENS:
            handler._send_json(200, {"input_tokens": billed_prompt(body)[0]})
        elif not isinstance(body.get("max_tokens"), int) or isinstance(body["max_tokens"], bool):
            self.error(400, "max_tokens: Field required")
        elif not 1 <= body["max_tokens"] <= MAX_TOKENS:
            self.error(400, f"max_tokens: must be between 1 and {MAX_TOKENS}")
        elif mode.name == "invalid-json":
            data = b'{"id": "msg_x", '
            handler._send_head(200, "application/json", len(data))
            handler.wfile.write(data)
            self.server.stats.add_delivered(self.tag, billed_prompt(body)[0])
        else:
            self.answer(mode)

    def answer(self, mode: Mode) -> None:
        body = self.body
        model = body.get("model") if isinstance(body.get("model"), str) else MODELS[0]
        prompt, cached = billed_prompt(body)
        n = min(body["max_tokens"], self.server.completion_tokens)
        completion = Completion(
            model=model,
            pieces=completion_pieces(model, n),
            finish_reason="length" if n < self.server.completion_tokens else "stop",
            prompt_tokens=prompt,
            completion_tokens=n,
            report_usage=mode.name != "no-usage",
            usage_fault=mode.name if mode.name in USAGE_FAULTS else None,
        )
        message = Message(completion, _tool_named(body), _cache_split(body, cached))
        if body.get("stream") is True:
            events = message.events()
            written = self.handler._send_stream(events, mode)
            sent = written == len(events)
            streamed = completion.tokens_in_pieces(written - FIRST_PIECE)
            self.server.stats.add_delivered(self.tag, prompt + streamed)
        else:
            sent = self.handler._send_reply(message.json(), mode)
            if sent:
                self.server.stats.add_delivered(self.tag, prompt + n)
        if sent:
            self.server.stats.add_usage(prompt, n)

    def echo_key(self, mode: Mode) -> None:
        """The key received, echoed: in header `x-echo-key` and a 401's message, or (a stream)
        in an event written in small pieces."""
        received = self.key_received()
        echo = ("x-echo-key", received)
        if not (isinstance(self.body, dict) and self.body.get("stream") is True):
            self.error(401, f"invalid x-api-key: {received}", echo)
            return
        delta = {"type": "text_delta", "text": f"You sent {received}."}
        block = {"type": "content_block_delta", "index": 0, "delta": delta}
        stop = '{"type":"message_stop"}'
        events = [("content_block_delta", _dumps(block)), ("message_stop", stop)]
        self.handler._send_head(200, "text/event-stream", None, echo)
        self.handler._write_pieces(b"".join(map(render, events)), mode.seed, True)
        self.handler.wfile.write(b"0\r\n\r\n")


def answer(handler: Any, raw: bytes, body: Any) -> None:
    """Answer an Anthropic request (see `serves`) on the mock's handler."""
    Answering(handler, raw, body).run()
