"""A mock of the OpenAI HTTP API: the upstream of TokenGate's end-to-end tests and demo.

Usage is computed with the gateway's own tokenizer (``tokengate_core.tokens``), so tests can
assert exact token accounting. Per request, header ``X-Mock-Mode`` makes it misbehave the way
real providers do: errors and rate limits, missing usage, slow or cut streams, SSE events split at
arbitrary byte offsets, broken JSON, connection resets, answers that never come or drip in byte
by byte, usage figures that are negative, absurd or not numbers. Header ``X-Mock-Prompt-Rule``
(or ``--prompt-rule``) makes it count prompts as another model's tokenizer would: ``scale:1.1``
(10 % above the gate's tokenizer), ``chars:3`` (a token per 3 characters of the prompt's text).
``GET /mock/stats`` tells what reached the provider (which keys, how many requests, how many
tokens served, and per ``X-Mock-Tag`` how many tokens actually left, cut answers included);
``POST /mock/reset`` zeroes it. ``--record FILE`` appends every request received (method, path,
headers, body) as a JSON line. ``X-Mock-Cached: N`` and ``X-Mock-Reasoning: N`` report that many
prompt tokens as read from the prompt cache and completion tokens as reasoning (parts of the
counts, as OpenAI reports them).
``GET /v1/models`` lists a few models, as OpenAI's API does, so ``client.models.list()`` works.
Azure OpenAI's paths are served too (``/openai/deployments/{deployment}/...``,
``/openai/v1/...``; the key in ``api-key`` or as a Bearer token): a deployment answers with the
model ``--deployment NAME=MODEL`` gives it, else with its own name. Anthropic's Messages API is
served too (``mock_anthropic.py``).

    tokengate-mock --port 0 --expect-key sk-provider
"""

from __future__ import annotations

import argparse
import base64
import copy
import errno
import hashlib
import json
import math
import os
import random
import re
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from email.message import Message
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from tokengate_core import tokens
from tokengate_core.dialects.openai import estimate_prompt

ENDPOINTS = ("chat/completions", "completions", "embeddings", "responses")
MAX_TOKEN_FIELDS = {
    "chat/completions": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
}
MODES = (
    "normal",
    "no-usage",
    "slow",
    "cut",  # the connection closed mid-body (FIN)
    "split",
    "invalid-json",
    "reset",  # the connection reset (RST) before any byte of the answer
    "reset-mid",  # the connection reset after the headers and about half the body
    "hang",  # the request is read and never answered, until the client goes away
    "drip",  # the answer written one byte at a time
    "usage-negative",  # usage figures below zero
    "usage-absurd",  # usage figures of 10^15
    "usage-float",  # usage figures with a fraction
    "usage-string",  # usage figures as JSON strings
    "echo-key",  # the key received, echoed: in a 401 and a header, or in a stream split apart
)  # and "error:CODE"
# Usage figures as a misbehaving provider reports them (generation endpoints).
USAGE_FAULTS = {
    "usage-negative": lambda n: -(n + 1),
    "usage-absurd": lambda n: 10**15,
    "usage-float": lambda n: n + 0.5,
    "usage-string": str,
}
# A "hang" answer gives up after this long (or X-Mock-Delay) even if the client stays.
HANG_SECONDS = 30.0
DRIP_DELAY = 0.0005  # seconds between the bytes of a "drip" answer
# Before a reset, so the bytes already written reach the reader and are not lost with the RST.
RESET_GRACE = 0.1
ERROR_MODE = re.compile(r"error:([45]\d\d)")
# How prompts are counted: "exact" (the gate's tokenizer), "scale:F" (that count times F, rounded
# up), "chars:N" (a token per N characters of the prompt's text, rounded up).
PROMPT_RULE = re.compile(r"exact|(scale|chars):([0-9]{1,3}(\.[0-9]{1,6})?)")
PROMPT_FIELDS = ("messages", "prompt", "input", "instructions", "tools")
DEFAULT_SLOW_DELAY = 2.0
DEFAULT_MODEL = "mock-model"
# What `GET /v1/models` lists (any model name is served; these are the ones it names).
MODELS = (DEFAULT_MODEL, "gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "text-embedding-3-small")
MODELS_CREATED = 1_700_000_000  # a fixed `created`, so the list is the same on every run
# Like OpenAI's models, the mock refuses (400) to generate more than this in one completion.
MAX_COMPLETION_TOKENS = 16_384
STREAM_PIECES = 8
EMBEDDING_SIZE = 8
SPLIT_PIECE_BYTES = (1, 40)
# Long enough for the kernel to hand each piece to the reader separately, short enough to be fast.
SPLIT_PIECE_DELAY = 0.001
KEEP_ALIVE = b": keep-alive\n\n"
MAX_AUTH_HEADERS_SEEN = 20
KEY_HEADERS = ("x-api-key", "api-key")  # where a caller key could leak besides Authorization
# Plain ASCII words and single spaces: any prefix of its tokens decodes to text that re-encodes
# to exactly that many tokens, in every shipped encoding.
LOREM = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud "
    "exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat. Duis aute irure "
    "dolor in reprehenderit in voluptate velit esse cillum dolore eu fugiat nulla pariatur. "
    "Excepteur sint occaecat cupidatat non proident, sunt in culpa qui officia deserunt "
    "mollit anim id est laborum."
)

Event = tuple[str | None, str]  # (SSE event name, data line)
DONE: Event = (None, "[DONE]")


AZURE_DEPLOYMENT = re.compile(r"(?:openai/)?deployments/([^/]+)/(.+)")


def api_name(path: str) -> str:
    """A path without its API prefix: /v1 (OpenAI), /openai and /openai/v1 (Azure)."""
    return path.strip("/").removeprefix("openai/").removeprefix("v1/")


def endpoint_of(path: str) -> tuple[str | None, str | None]:
    """(the API endpoint a path names, the Azure deployment it names)."""
    deployment = AZURE_DEPLOYMENT.fullmatch(path.strip("/"))
    name = deployment[2] if deployment else api_name(path)
    return (name if name in ENDPOINTS else None), (deployment[1] if deployment else None)


def model_object(model: str) -> dict:
    return {"id": model, "object": "model", "created": MODELS_CREATED, "owned_by": "mock"}


def models_reply(path: str) -> tuple[int, dict] | None:
    """`GET /v1/models` and `GET /v1/models/{id}` in OpenAI's shape: (status, body), or None for
    a path that is not about models."""
    name = api_name(path)
    if name == "models":
        return 200, {"object": "list", "data": [model_object(model) for model in MODELS]}
    model = name.removeprefix("models/")
    if model == name or not model:
        return None
    if model in MODELS:
        return 200, model_object(model)
    error = {
        "message": f"The model '{model}' does not exist",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    }
    return 404, {"error": error}


def billed_prompt(endpoint: str, body: dict, rule: str = "exact") -> int:
    """The prompt tokens a provider bills: counted exactly however long (the gate bounds its own
    estimate of a huge prompt; a provider does not), or by another `rule` (PROMPT_RULE)."""
    kind, _, figure = rule.partition(":")
    if kind == "chars":
        return max(1, math.ceil(len(prompt_text(body)) / float(figure)))
    exact = estimate_prompt(endpoint, body, exact_chars=sys.maxsize)
    return math.ceil(exact * float(figure) - 1e-9) if kind == "scale" else exact


def prompt_text(value: Any, fields: tuple[str, ...] = PROMPT_FIELDS) -> str:
    """Every string in the request's prompt fields (roles and names included), run together."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return "".join(prompt_text(v, ()) for k, v in value.items() if not fields or k in fields)
    if isinstance(value, list):
        return "".join(prompt_text(item, ()) for item in value)
    return ""


def is_prompt_rule(rule: str) -> bool:
    match = PROMPT_RULE.fullmatch(rule)
    return match is not None and (match[2] is None or float(match[2]) > 0)


def is_mode(name: str) -> bool:
    return name in MODES or ERROR_MODE.fullmatch(name) is not None


def max_tokens(endpoint: str, body: dict) -> int | None:
    for key in MAX_TOKEN_FIELDS[endpoint]:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


@lru_cache(maxsize=64)
def _completion_ids(encoding_name: str, n: int) -> tuple[int, ...]:
    encoding = tokens.get_encoding(encoding_name)
    copies = n // len(encoding.encode(LOREM)) + 1
    return tuple(encoding.encode(" ".join([LOREM] * copies))[:n])


def completion_pieces(model: str | None, n: int) -> list[str]:
    """A completion of exactly n tokens in the model's encoding, cut into stream-sized pieces."""
    encoding = tokens.encoding_for_model(model)
    ids = _completion_ids(encoding.name, n)
    size = max(1, -(-n // STREAM_PIECES))
    return [encoding.decode(list(ids[i : i + size])) for i in range(0, n, size)]


def render(event: Event, newline: str = "\n") -> bytes:
    name, data = event
    lines = [f"event: {name}"] if name else []
    lines.append(f"data: {data}")
    return (newline.join(lines) + newline * 2).encode()


def split_payload(events: list[Event]) -> bytes:
    """The whole stream with quirks a correct SSE parser survives: CRLF on every other event
    and keep-alive comments between some."""
    out = bytearray()
    for i, event in enumerate(events):
        if i % 3 == 1:
            out += KEEP_ALIVE
        out += render(event, "\r\n" if i % 2 else "\n")
    return bytes(out)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _embedding(item: Any, as_base64: bool) -> list[float] | str:
    """A tiny vector derived from the input, so equal inputs get equal embeddings."""
    digest = hashlib.sha256(_dumps(item).encode()).digest()
    vector = [round(b / 127.5 - 1, 4) for b in digest[:EMBEDDING_SIZE]]
    if as_base64:  # what the openai SDK asks for by default
        return base64.b64encode(struct.pack(f"<{EMBEDDING_SIZE}f", *vector)).decode()
    return vector


def embeddings_reply(body: dict, model: str, prompt_tokens: int, report_usage: bool) -> dict:
    value = body.get("input")
    single = not isinstance(value, list) or not value or isinstance(value[0], int)
    items = [value] if single else value
    as_base64 = body.get("encoding_format") == "base64"
    reply: dict[str, Any] = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _embedding(item, as_base64)}
            for i, item in enumerate(items)
        ],
        "model": model,
    }
    if report_usage:
        reply["usage"] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return reply


@dataclass
class Completion:
    """One generated answer, rendered in the shape of whichever endpoint was asked."""

    model: str
    pieces: list[str]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    report_usage: bool
    usage_fault: str | None = None  # a key of USAGE_FAULTS
    cached_tokens: int = 0  # of the prompt, read from the prompt cache (X-Mock-Cached)
    reasoning_tokens: int = 0  # of the completion, spent reasoning (X-Mock-Reasoning)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def _figure(self, count: int) -> Any:
        """A usage figure as reported: the true count, or the mode's fault."""
        return USAGE_FAULTS[self.usage_fault](count) if self.usage_fault else count

    def _usage(self) -> dict:
        usage = {
            "prompt_tokens": self._figure(self.prompt_tokens),
            "completion_tokens": self._figure(self.completion_tokens),
            "total_tokens": self._figure(self.prompt_tokens + self.completion_tokens),
        }
        if self.cached_tokens or self.reasoning_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
            usage["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return usage

    def tokens_in_pieces(self, delivered: int) -> int:
        """Completion tokens in the first `delivered` pieces (each piece is whole tokens)."""
        size = max(1, -(-self.completion_tokens // STREAM_PIECES))
        return min(self.completion_tokens, max(0, delivered) * size)

    def _head(self, prefix: str, kind: str) -> dict:
        return {
            "id": prefix + self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
        }

    def chat(self) -> dict:
        message = {"role": "assistant", "content": self.text, "refusal": None}
        reply = self._head("chatcmpl-", "chat.completion") | {
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
            ],
        }
        if self.report_usage:
            reply["usage"] = self._usage()
        return reply

    def chat_events(self, include_usage: bool) -> list[Event]:
        include_usage = include_usage and self.report_usage

        def chunk(choices: list[dict]) -> dict:
            head = self._head("chatcmpl-", "chat.completion.chunk")
            return head | {"system_fingerprint": None, "choices": choices}

        def delta(content: dict, finish_reason: str | None = None) -> dict:
            choice = {
                "index": 0,
                "delta": content,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            # Like OpenAI: with include_usage every chunk carries "usage": null but the last.
            return chunk([choice]) | ({"usage": None} if include_usage else {})

        chunks = [delta({"role": "assistant", "content": ""})]
        chunks += [delta({"content": piece}) for piece in self.pieces]
        chunks.append(delta({}, self.finish_reason))
        if include_usage:
            chunks.append(chunk([]) | {"usage": self._usage()})
        return [(None, _dumps(c)) for c in chunks] + [DONE]

    def text_completion(self, piece: str | None = None, finish_reason: str | None = None) -> dict:
        """The whole completion, or (with a piece) one stream chunk of it."""
        choice = {
            "text": self.text if piece is None else piece,
            "index": 0,
            "logprobs": None,
            "finish_reason": self.finish_reason if piece is None else finish_reason,
        }
        reply = self._head("cmpl-", "text_completion") | {"choices": [choice]}
        if piece is None and self.report_usage:
            reply["usage"] = self._usage()
        return reply

    def text_completion_events(self, include_usage: bool) -> list[Event]:
        chunks = [self.text_completion(piece) for piece in self.pieces]
        chunks.append(self.text_completion("", self.finish_reason))
        if include_usage and self.report_usage:
            chunks.append(
                self._head("cmpl-", "text_completion") | {"choices": [], "usage": self._usage()}
            )
        return [(None, _dumps(c)) for c in chunks] + [DONE]

    def _message(self, status: str, text: str) -> dict:
        return {
            "id": "msg_" + self.id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if text else [],
        }

    def response(self, status: str = "completed") -> dict:
        done = status == "completed"
        reply = {
            "id": "resp_" + self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": [self._message("completed", self.text)] if done else [],
            "error": None,
            "incomplete_details": None,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
        }
        if self.report_usage:
            reply["usage"] = (
                {
                    "input_tokens": self._figure(self.prompt_tokens),
                    "input_tokens_details": {"cached_tokens": self.cached_tokens},
                    "output_tokens": self._figure(self.completion_tokens),
                    "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                    "total_tokens": self._figure(self.prompt_tokens + self.completion_tokens),
                }
                if done
                else None
            )
        return reply

    def response_events(self) -> list[Event]:
        """The typed events of the Responses API; it ends with response.completed, no [DONE]."""
        where = {"item_id": "msg_" + self.id, "output_index": 0, "content_index": 0}
        part = {"type": "output_text", "text": self.text, "annotations": []}
        events: list[tuple[str, dict]] = [
            ("response.created", {"response": self.response("in_progress")}),
            ("response.in_progress", {"response": self.response("in_progress")}),
            (
                "response.output_item.added",
                {"output_index": 0, "item": self._message("in_progress", "")},
            ),
            ("response.content_part.added", where | {"part": part | {"text": ""}}),
            *[
                ("response.output_text.delta", where | {"delta": piece, "logprobs": []})
                for piece in self.pieces
            ],
            ("response.output_text.done", where | {"text": self.text, "logprobs": []}),
            ("response.content_part.done", where | {"part": part}),
            (
                "response.output_item.done",
                {"output_index": 0, "item": self._message("completed", self.text)},
            ),
            ("response.completed", {"response": self.response()}),
        ]
        return [
            (name, _dumps({"type": name, "sequence_number": i} | data))
            for i, (name, data) in enumerate(events)
        ]


@dataclass(frozen=True)
class Mode:
    """How to (mis)behave for one request, from the X-Mock-* headers."""

    name: str
    delay: float
    seed: int
    prompt_rule: str = "exact"

    @classmethod
    def from_headers(cls, headers: Message, default: str, default_rule: str = "exact") -> Mode:
        name = headers.get("X-Mock-Mode") or default
        if not is_mode(name):
            raise ValueError(f"Unknown X-Mock-Mode {name!r}")
        rule = headers.get("X-Mock-Prompt-Rule") or default_rule
        if not is_prompt_rule(rule):
            raise ValueError(f"Unknown X-Mock-Prompt-Rule {rule!r} (exact, scale:F, chars:N)")
        try:
            delay = max(0.0, float(headers.get("X-Mock-Delay", DEFAULT_SLOW_DELAY)))
            return cls(name, delay, int(headers.get("X-Mock-Seed", 0)), rule)
        except ValueError:
            raise ValueError("X-Mock-Delay must be a number, X-Mock-Seed an integer") from None

    @property
    def error_status(self) -> int | None:
        match = ERROR_MODE.fullmatch(self.name)
        return int(match[1]) if match else None


class Stats:
    """What reached the provider: lets tests check what the gateway forwarded and spent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._data: dict[str, Any] = {
                "requests": 0,
                "by_endpoint": {},
                "authorized": 0,
                "unauthorized": 0,
                "auth_headers_seen": [],
                "other_headers_seen": dict.fromkeys(KEY_HEADERS, 0),
                "tokens_served": {"prompt": 0, "completion": 0, "total": 0},
                "delivered_by_tag": {},
                "last_request": None,
            }

    def snapshot(self) -> dict:
        with self._lock:
            return copy.deepcopy(self._data)

    def record(
        self, path: str, endpoint: str | None, headers: Message, body: Any, authorized: bool
    ) -> None:
        with self._lock:
            data = self._data
            data["requests"] += 1
            key = endpoint or path
            data["by_endpoint"][key] = data["by_endpoint"].get(key, 0) + 1
            data["authorized" if authorized else "unauthorized"] += 1
            auth, seen = headers.get("Authorization"), data["auth_headers_seen"]
            if auth is not None and auth not in seen and len(seen) < MAX_AUTH_HEADERS_SEEN:
                seen.append(auth)
            for name in KEY_HEADERS:
                if name in headers:
                    data["other_headers_seen"][name] += 1
            data["last_request"] = {"path": path, "headers": dict(headers.items()), "body": body}

    def add_usage(self, prompt: int, completion: int) -> None:
        with self._lock:
            served = self._data["tokens_served"]
            served["prompt"] += prompt
            served["completion"] += completion
            served["total"] += prompt + completion

    def add_delivered(self, tag: str, total: int) -> None:
        """Tokens that left in an answer (whole or cut short), for the caller tagged `tag`."""
        with self._lock:
            delivered = self._data["delivered_by_tag"]
            delivered[tag] = delivered.get(tag, 0) + total


class MockHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mock-openai"
    # Headers and body go out in separate writes; with Nagle on, each answer on a kept-alive
    # connection would wait for the client's delayed ACK (~40 ms).
    disable_nagle_algorithm = True
    server: MockServer

    def do_GET(self) -> None:
        body = self._read_body()
        if self._path == "/mock/stats":
            self._send_json(200, self.server.stats.snapshot())
        else:
            self._api(body)

    def do_POST(self) -> None:
        body = self._read_body()
        if self._path == "/mock/reset":
            self.server.stats.reset()
            self._send_json(200, {"reset": True})
        else:
            self._api(body)

    def handle_one_request(self) -> None:
        """A client that goes away mid-answer (or fails the TLS handshake) just ends quietly."""
        try:
            super().handle_one_request()
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    @property
    def _path(self) -> str:
        return urlsplit(self.path).path

    def _read_body(self) -> bytes:
        """Read the whole request body, so a kept-alive connection stays in step."""
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline().strip():  # trailers
            pass
        return b"".join(parts)

    def _api(self, raw: bytes) -> None:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # nested too deeply: as unreadable as bad JSON
            body = None
        from tokengate_core.tools import mock_anthropic  # it builds on this module

        if mock_anthropic.serves(self._path, self.headers):
            mock_anthropic.answer(self, raw, body)
            return
        endpoint, deployment = endpoint_of(self._path)
        expected = self.server.expect_key
        authorized = expected is None or (
            self.headers.get("Authorization") == f"Bearer {expected}"
            or self.headers.get("api-key") == expected  # Azure's header
        )
        self.server.stats.record(self._path, endpoint, self.headers, body, authorized)
        self.server.write_record(self.command, self.path, self.headers, raw)
        models = models_reply(self._path) if self.command == "GET" else None
        if not authorized:
            self._send_error(401, "Incorrect API key provided", "invalid_api_key")
        elif models is not None:
            self._send_json(*models)
        elif endpoint is None:
            self._send_error(
                404, f"Unknown request URL: {self.command} {self._path}", "unknown_url"
            )
        else:
            try:
                mode = Mode.from_headers(self.headers, self.server.mode, self.server.prompt_rule)
            except ValueError as e:
                self._send_error(400, str(e))
                return
            if mode.error_status:
                self._send_error(mode.error_status, f"Mock provider error ({mode.name})")
            elif mode.name == "echo-key":
                self._echo_key(body, mode)
            elif mode.name == "reset":
                self._reset()
            elif mode.name == "hang":
                self._hang(mode)
            elif not isinstance(body, dict):
                self._send_error(400, "We could not parse the JSON body of your request.")
            elif mode.name == "invalid-json":
                data = b'{"id": "x", '
                self._send_head(200, "application/json", len(data))
                self.wfile.write(data)
                # The prompt was read (and would be billed) before the answer broke.
                tag = self.headers.get("X-Mock-Tag", "-")
                billed = billed_prompt(endpoint, body, mode.prompt_rule)
                self.server.stats.add_delivered(tag, billed)
            else:
                self._answer(endpoint, body, mode, deployment)

    def _answer(self, endpoint: str, body: dict, mode: Mode, deployment: str | None) -> None:
        model = body.get("model") if isinstance(body.get("model"), str) else None
        if deployment is not None:  # Azure: the deployment decides, whatever the body says
            model = self.server.deployments.get(deployment, deployment)
        prompt = billed_prompt(endpoint, body, mode.prompt_rule)
        report_usage = mode.name != "no-usage"
        tag = self.headers.get("X-Mock-Tag", "-")
        if endpoint == "embeddings":
            reply = embeddings_reply(body, model or DEFAULT_MODEL, prompt, report_usage)
            if self._send_reply(reply, mode):
                self.server.stats.add_usage(prompt, 0)
                self.server.stats.add_delivered(tag, prompt)
            return
        limit = max_tokens(endpoint, body)
        if limit is not None and limit > MAX_COMPLETION_TOKENS:
            self._send_error(
                400,
                f"max_tokens is too large: {limit}. This model supports at most "
                f"{MAX_COMPLETION_TOKENS} completion tokens.",
                "invalid_value",
            )
            return
        n = self.server.completion_tokens if limit is None else limit
        completion = Completion(
            model=model or DEFAULT_MODEL,
            pieces=completion_pieces(model, n),
            finish_reason="stop" if limit is None else "length",
            prompt_tokens=prompt,
            completion_tokens=n,
            report_usage=report_usage,
            usage_fault=mode.name if mode.name in USAGE_FAULTS else None,
            cached_tokens=min(prompt, self._count_header("X-Mock-Cached")),
            reasoning_tokens=min(n, self._count_header("X-Mock-Reasoning")),
        )
        if body.get("stream") is True:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            events = {
                "chat/completions": lambda: completion.chat_events(include_usage),
                "completions": lambda: completion.text_completion_events(include_usage),
                "responses": completion.response_events,
            }[endpoint]()
            written = self._send_stream(events, mode)
            sent = written == len(events)
            # Events before the first piece: chat's role chunk, the Responses API's four.
            first_piece = {"chat/completions": 1, "completions": 0, "responses": 4}[endpoint]
            self.server.stats.add_delivered(
                tag, prompt + completion.tokens_in_pieces(written - first_piece)
            )
        else:
            reply = {
                "chat/completions": completion.chat,
                "completions": completion.text_completion,
                "responses": completion.response,
            }[endpoint]()
            sent = self._send_reply(reply, mode)
            if sent:  # a JSON answer cut short is no answer: nothing in it can be used
                self.server.stats.add_delivered(tag, prompt + n)
        if sent:
            self.server.stats.add_usage(prompt, n)

    def _count_header(self, name: str) -> int:
        """A count a test asked for in a header; 0 when absent or not a whole number."""
        value = self.headers.get(name, "0")
        return int(value) if value.isdigit() else 0

    def _send_head(self, status: int, content_type: str, length: int | None, *extra) -> None:
        """Status and headers; without a length the body is sent chunked."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache")
        else:
            self.send_header("Content-Length", str(length))
        self.send_header("x-mock-provider", "1")
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()

    def _send_json(self, status: int, value: Any, *extra) -> None:
        data = _dumps(value).encode()
        self._send_head(status, "application/json", len(data), *extra)
        self.wfile.write(data)

    def _send_error(self, status: int, message: str, code: str | None = None) -> None:
        kind, extra = "invalid_request_error", ()
        if status == 429:
            kind, code = "tokens", code or "rate_limit_exceeded"
            extra = (
                ("x-ratelimit-limit-tokens", "30000"),
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", "7s"),
                ("retry-after", "7"),
                ("retry-after-ms", "7000"),
            )
        elif status >= 500:
            kind = "server_error"
        error = {"message": message, "type": kind, "param": None, "code": code}
        self._send_json(status, {"error": error}, *extra)

    def _echo_key(self, body: Any, mode: Mode) -> None:
        """Repeat the key received, as some OpenAI-compatible servers do: in header
        `x-echo-key` and a 401's message, or (a stream) in an event written in small pieces."""
        received = self.headers.get("Authorization", "").removeprefix("Bearer ")
        echo = ("x-echo-key", received)
        if not (isinstance(body, dict) and body.get("stream") is True):
            message = f"Incorrect API key provided: {received}."
            error = {"message": message, "type": "invalid_request_error", "code": "invalid_api_key"}
            self._send_json(401, {"error": error}, echo)
            return
        delta = {"choices": [{"index": 0, "delta": {"content": f"You sent {received}."}}]}
        self._send_head(200, "text/event-stream", None, echo)
        self._write_pieces(b"".join(map(render, [(None, _dumps(delta)), DONE])), mode.seed, True)
        self.wfile.write(b"0\r\n\r\n")

    def _send_reply(self, reply: dict, mode: Mode) -> bool:
        """A JSON answer; False when the mode cut it short."""
        if mode.name == "slow":
            time.sleep(mode.delay)
        data = _dumps(reply).encode()
        self._send_head(200, "application/json", len(data))
        if mode.name in ("cut", "reset-mid"):
            self.wfile.write(data[: len(data) // 2])
            self._cut() if mode.name == "cut" else self._reset()
            return False
        if mode.name == "split":
            self._write_pieces(data, mode.seed, chunked=False)
        elif mode.name == "drip":
            self._write_pieces(data, mode.seed, chunked=False, sizes=(1, 1), delay=DRIP_DELAY)
        else:
            self.wfile.write(data)
        return True

    def _send_stream(self, events: list[Event], mode: Mode) -> int:
        """SSE events, one HTTP chunk each and paced; how many were written (fewer when the
        mode cut the stream short)."""
        self._send_head(200, "text/event-stream", None)
        if mode.name == "split":
            self._write_pieces(split_payload(events), mode.seed, chunked=True)
        elif mode.name == "drip":
            self._write_pieces(
                b"".join(map(render, events)), mode.seed, True, sizes=(1, 1), delay=DRIP_DELAY
            )
        else:
            delay = mode.delay if mode.name == "slow" else self.server.stream_delay
            cut = mode.name in ("cut", "reset-mid")
            sent = events[: max(1, len(events) // 2)] if cut else events
            for i, event in enumerate(sent):
                if i:
                    time.sleep(delay)
                self._write_chunk(render(event))
            if cut:
                self._cut() if mode.name == "cut" else self._reset()
                return len(sent)
        self.wfile.write(b"0\r\n\r\n")
        return len(events)

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))

    def _write_pieces(
        self,
        data: bytes,
        seed: int,
        chunked: bool,
        sizes: tuple[int, int] = SPLIT_PIECE_BYTES,
        delay: float = SPLIT_PIECE_DELAY,
    ) -> None:
        """Write in random small pieces, so the reader sees splits at arbitrary byte offsets."""
        rng = random.Random(seed)
        start = 0
        while start < len(data):
            end = start + rng.randint(*sizes)
            piece = data[start:end]
            if chunked:
                self._write_chunk(piece)
            else:
                self.wfile.write(piece)
            start = end
            time.sleep(delay)

    def _cut(self) -> None:
        """Drop the connection mid-body, as a crashing provider would."""
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0), as a crashed host or a load
        balancer does; bytes already written are given a moment to reach the reader first."""
        self.wfile.flush()
        time.sleep(RESET_GRACE)
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _hang(self, mode: Mode) -> None:
        """Never answer: wait until the client closes the connection (or a bound passes)."""
        bound = mode.delay if "X-Mock-Delay" in self.headers else HANG_SECONDS
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.connection], [], [], 0.05)
            if ready:
                if not self.connection.recv(1, socket.MSG_PEEK):
                    break  # the client went away
                time.sleep(0.05)  # it sent more: not read, the answer never comes anyway
        self.close_connection = True


class MockServer(ThreadingHTTPServer):
    """The HTTP server, holding the settings and counters its handler threads share."""

    daemon_threads = True

    def __init__(
        self,
        host: str,
        port: int,
        *,
        expect_key: str | None,
        mode: str,
        prompt_rule: str = "exact",
        completion_tokens: int,
        stream_delay: float,
        ssl_context: ssl.SSLContext | None,
        quiet: bool,
        record: str | None = None,
        deployments: dict[str, str] | None = None,
    ) -> None:
        self._record = None  # set before binding: a failed bind calls server_close()
        super().__init__((host, port), MockHandler)
        self._record_lock = threading.Lock()
        self._record = open(record, "a", encoding="utf-8") if record else None  # noqa: SIM115
        self.host = host
        self.expect_key = expect_key
        self.mode = mode
        self.prompt_rule = prompt_rule
        self.completion_tokens = completion_tokens
        self.stream_delay = stream_delay
        self.quiet = quiet
        self.deployments = deployments or {}  # Azure deployment -> the model it answers with
        self.stats = Stats()
        self.scheme = "http"
        if ssl_context:
            # The handshake then happens in the handler thread, not in the accept loop.
            self.socket = ssl_context.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )
            self.scheme = "https"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.server_address[1]}"

    def write_record(self, method: str, target: str, headers: Message, raw: bytes) -> None:
        """One JSON line per request received, when recording (what the provider was sent)."""
        if self._record is None:
            return
        line = _dumps(
            {
                "method": method,
                "target": target,
                "headers": list(headers.items()),
                "body": raw.decode("utf-8", "replace"),
            }
        )
        with self._record_lock:
            self._record.write(line + "\n")
            self._record.flush()

    def server_close(self) -> None:
        super().server_close()
        if self._record is not None:
            self._record.close()


def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    expect_key: str | None = None,
    *,
    mode: str = "normal",
    prompt_rule: str = "exact",
    completion_tokens: int = 120,
    stream_delay: float = 0.01,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    quiet: bool = False,
    record: str | None = None,
    deployments: dict[str, str] | None = None,
) -> tuple[MockServer, threading.Thread]:
    """Start the mock on a background thread; stop it with shutdown() then server_close()."""
    ssl_context = None
    if tls_cert:
        ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_context.load_cert_chain(tls_cert, tls_key)
    tokens.preload()  # so the first request does not pay for building the encodings
    server = MockServer(
        host,
        port,
        expect_key=expect_key,
        mode=mode,
        prompt_rule=prompt_rule,
        completion_tokens=completion_tokens,
        stream_delay=stream_delay,
        ssl_context=ssl_context,
        quiet=quiet,
        record=record,
        deployments=deployments,
    )
    # A short poll interval makes shutdown() return promptly.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="mock-openai", daemon=True
    )
    thread.start()
    return server, thread


def cannot_listen(host: str, port: int, error: OSError) -> str:
    """Why the mock could not start, and what to do about it."""
    if error.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is busy (another mock, or a demo still running?); "
            "choose another with --port PORT (--port 0 picks a free one)"
        )
    return f"cannot listen at {host}:{port}: {error.strerror or error}"


def _mode_arg(value: str) -> str:
    if not is_mode(value):
        raise argparse.ArgumentTypeError(f"one of {', '.join(MODES)} or error:CODE")
    return value


def _prompt_rule_arg(value: str) -> str:
    if not is_prompt_rule(value):
        raise argparse.ArgumentTypeError("exact, scale:F or chars:N (F, N positive numbers)")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tokengate-mock", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4010, help="0 picks a free port")
    parser.add_argument(
        "--expect-key",
        default=os.environ.get("TOKENGATE_MOCK_PROVIDER_KEY"),
        help="provider key to require, as a Bearer token or in api-key "
        "(default: $TOKENGATE_MOCK_PROVIDER_KEY; unset: accept anything)",
    )
    parser.add_argument("--tls-cert", help="PEM certificate: serve HTTPS")
    parser.add_argument("--tls-key", help="PEM private key (default: in --tls-cert)")
    parser.add_argument(
        "--completion-tokens",
        type=int,
        default=120,
        help="completion length when the request sets no max tokens",
    )
    parser.add_argument(
        "--mode", type=_mode_arg, default="normal", help="default for header X-Mock-Mode"
    )
    parser.add_argument(
        "--prompt-rule",
        type=_prompt_rule_arg,
        default="exact",
        help="default for header X-Mock-Prompt-Rule: exact, scale:F or chars:N",
    )
    parser.add_argument(
        "--stream-delay", type=float, default=0.01, help="seconds between stream chunks"
    )
    parser.add_argument("--quiet", action="store_true", help="no request log on stderr")
    parser.add_argument("--record", help="append every request received to this file (JSONL)")
    parser.add_argument(
        "--deployment",
        action="append",
        default=[],
        metavar="NAME=MODEL",
        help="Azure: the model a deployment answers with (default: the deployment's name)",
    )
    args = parser.parse_args(argv)
    if args.tls_key and not args.tls_cert:
        parser.error("--tls-key needs --tls-cert")
    if args.completion_tokens < 0:
        parser.error("--completion-tokens must not be negative")
    deployments = [entry.partition("=") for entry in args.deployment]
    if not all(name and model for name, _, model in deployments):
        parser.error("--deployment takes NAME=MODEL")
    args.deployments = {name: model for name, _, model in deployments}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        server, _thread = serve(
            args.host,
            args.port,
            args.expect_key,
            mode=args.mode,
            prompt_rule=args.prompt_rule,
            completion_tokens=args.completion_tokens,
            stream_delay=args.stream_delay,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            quiet=args.quiet,
            record=args.record,
            deployments=args.deployments,
        )
    except OSError as e:
        print(f"tokengate-mock: {cannot_listen(args.host, args.port, e)}", file=sys.stderr)
        return 2
    print(f"mock-openai listening at {server.url}", flush=True)
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
