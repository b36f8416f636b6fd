"""Anthropic's Messages API: `messages` is metered (JSON and SSE), `messages/count_tokens` and
the model list pass unmetered with the provider's key, everything else is refused.

No tokenizer of Anthropic's runs offline, so the prompt estimate is tiktoken's count raised by a
documented margin (PROMPT_MARGIN): Claude's tokenizer writes more tokens than OpenAI's for the
same text, and the estimate must stay an upper bound. `max_tokens` is required by the API, so
the completion reserve is exact; a body without it gets the API's own 400 from the gate.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import math
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .. import keys
from ..limiter import REQUESTS, LimitStatus, Usage, most_restrictive, whole_number
from ..tokens import PromptCounter
from . import base
from .base import BodyRefused, Endpoint, RequestTerms
from .openai import believable, model_of

METERED_ENDPOINT = "messages"
# Allowed, not metered: counting tokens costs nothing, and the model list is read-only.
UNMETERED_POSTS = ("messages/count_tokens",)
READ_ONLY_ENDPOINTS = ("models",)
# The parts of the prompt Anthropic reports apart: uncached input, cache writes, cache reads.
PROMPT_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")

# Claude's tokenizer writes up to about a third more tokens than tiktoken's o200k_base for the
# same English or code; the estimate is tiktoken's count times this, meant to stay above what
# Anthropic bills (the static part of the estimate: it is not learned from the bills).
PROMPT_MARGIN = 1.4
# Framing Anthropic adds around the conversation (roles, turn markers), per message and once.
TOKENS_PER_MESSAGE = 5
TOKENS_PER_REQUEST = 10
# Anthropic scales an image to at most ~1.15 megapixels and bills (width x height) / 750 tokens:
# never more than this for one image, whatever its size.
MAX_IMAGE_TOKENS = 1600
PIXELS_PER_TOKEN = 750
# A PDF page is billed as its text plus an image of the page: bounded by this per page. Pages
# are counted from the file's page objects; a file whose pages cannot be counted (compressed
# object streams, a URL source) is bounded at one page per PDF_BYTES_PER_PAGE of it, and at
# most MAX_PDF_PAGES (Anthropic's limit per document).
TOKENS_PER_PDF_PAGE = 3000
PDF_BYTES_PER_PAGE = 3000
MAX_PDF_PAGES = 100
_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
# The error types Anthropic's SDKs know, for the gate's own answers (by the gate's code).
ERROR_TYPES = {
    "invalid_api_key": "authentication_error",
    "endpoint_not_allowed": "permission_error",
    "model_not_allowed": "permission_error",
    "model_price_unknown": "permission_error",
    "unknown_url": "not_found_error",
    "request_too_large": "request_too_large",
    "rate_limit_exceeded": "rate_limit_error",
    "insufficient_quota": "rate_limit_error",  # a spent budget: Anthropic has no such type
    "quota_store_unavailable": "overloaded_error",
    "gateway_error": "api_error",
}


# --- prompt estimate -------------------------------------------------------------------------


def _decoded(data: Any, limit: int | None = None) -> bytes:
    """The first `limit` bytes (all: None) of base64 data; empty when it is not base64."""
    if not isinstance(data, str):
        return b""
    text = data if limit is None else data[: (limit + 2) // 3 * 4]
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        return b""


def _image_size(head: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG or GIF header (other formats: unknown)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    if head.startswith((b"GIF87a", b"GIF89a")) and len(head) >= 10:
        return struct.unpack("<HH", head[6:10])
    return None


def image_tokens(source: Any) -> int:
    """What an image can cost: (width x height) / 750 when its header says its size, never
    above MAX_IMAGE_TOKENS (the most Anthropic bills for one image)."""
    size = _image_size(_decoded(source.get("data"), 32)) if isinstance(source, dict) else None
    if size is None:
        return MAX_IMAGE_TOKENS
    return min(MAX_IMAGE_TOKENS, math.ceil(size[0] * size[1] / PIXELS_PER_TOKEN))


def pdf_tokens(source: Any) -> int:
    """What a PDF document can cost: TOKENS_PER_PDF_PAGE for each page (see MAX_PDF_PAGES)."""
    data = _decoded(source.get("data")) if isinstance(source, dict) else b""
    pages = len(_PDF_PAGE.findall(data)) or math.ceil(len(data) / PDF_BYTES_PER_PAGE)
    pages = min(MAX_PDF_PAGES, pages) if data else MAX_PDF_PAGES
    return TOKENS_PER_PDF_PAGE * max(1, pages)


def content_parts(value: Any) -> tuple[list[str], int]:
    """The texts of a content value (a string or a list of blocks), and the tokens its images
    and PDFs can cost."""
    if isinstance(value, str):
        return [value], 0
    texts: list[str] = []
    media = 0
    for block in value if isinstance(value, list) else (value,):
        if isinstance(block, str):
            texts.append(block)
            continue
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        source = block.get("source")
        if kind == "image":
            media += image_tokens(source)
        elif kind == "document" and not (
            isinstance(source, dict) and source.get("type") in ("text", "content")
        ):
            media += pdf_tokens(source)
        elif kind == "document":
            inner = source.get("data", source.get("content"))
            more, cost = content_parts(inner)
            texts += more
            media += cost
        for field in ("text", "thinking", "name", "title", "context"):
            if isinstance(block.get(field), str):
                texts.append(block[field])
        if "input" in block:  # tool_use: the arguments, as JSON
            texts.append(json.dumps(block["input"], separators=(",", ":")))
        if "content" in block and kind != "document":  # tool_result: text, images
            more, cost = content_parts(block["content"])
            texts += more
            media += cost
    return texts, media


def estimate_prompt(body: dict[str, Any], exact_chars: int) -> int:
    """An upper bound of the input tokens Anthropic bills for a Messages request: tiktoken's
    count of its texts times PROMPT_MARGIN, framing, and bounded images and PDFs."""
    count = PromptCounter(model_of(body), exact_chars)
    texts, media = content_parts(body.get("system"))
    messages = body.get("messages")
    messages = messages if isinstance(messages, list) else []
    for message in messages:
        if isinstance(message, dict):
            more, cost = content_parts(message.get("content"))
            texts += more
            media += cost
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        texts.append(json.dumps(tools, separators=(",", ":")))
    counted = sum(count(text) for text in texts)
    framing = TOKENS_PER_REQUEST + TOKENS_PER_MESSAGE * len(messages)
    return math.ceil(counted * PROMPT_MARGIN) + framing + media


# --- usage ------------------------------------------------------------------------------------


def usage_of(figures: Any, known: Usage | None = None) -> Usage | None:
    """Usage from an Anthropic `usage` object: prompt = input + cache writes + cache reads.

    Figures a `message_delta` leaves out (or null) are those already `known` from
    `message_start`; its `output_tokens` is the stream's cumulative count, taken as it is.
    """
    if not isinstance(figures, dict):
        return None
    output = believable(figures.get("output_tokens"))
    if known is None:
        before: tuple[int | None, ...] = (None, 0, 0)
    else:
        fresh = known.prompt - known.cache_write - known.cached_prompt
        before = (fresh, known.cache_write, known.cached_prompt)
    fresh, write, read = (
        default if figures.get(field) is None else believable(figures[field])
        for field, default in zip(PROMPT_FIELDS, before, strict=True)
    )
    if output is None or fresh is None or write is None or read is None:
        return None
    return Usage(fresh + write + read, output, cached_prompt=read, cache_write=write)


def generated_text(payload: Any) -> str:
    """The text of a message, or of a stream event's delta (text, tool arguments, thinking)."""
    if not isinstance(payload, dict):
        return ""
    holders: Iterable[Any] = payload.get("content") or ()
    if payload.get("type") == "content_block_start":
        holders = (payload.get("content_block"),)
    elif payload.get("type") == "content_block_delta":
        holders = (payload.get("delta"),)
    parts: list[str] = []
    for block in holders if isinstance(holders, (list, tuple)) else ():
        if not isinstance(block, dict):
            continue
        for field in ("text", "thinking", "partial_json"):
            if isinstance(block.get(field), str):
                parts.append(block[field])
        if block.get("type") in ("tool_use", "server_tool_use") and block.get("input"):
            parts.append(json.dumps(block["input"], separators=(",", ":")))
    return "".join(parts)


def answered_model(payload: Any) -> str | None:
    """The model a message names (a stream names it in `message_start`'s message)."""
    return base.answered_model(payload, "message")


class AnthropicStream:
    """`message_start` reports the prompt (and a placeholder output count), the last
    `message_delta` the cumulative output; the gate's trailer goes before `message_stop`."""

    def usage(self, payload: Any, so_far: Usage | None) -> Usage | None:
        if not isinstance(payload, dict):
            return so_far
        if payload.get("type") == "message_start":
            message = payload.get("message")
            found = usage_of(message.get("usage")) if isinstance(message, dict) else None
            return found or so_far
        if payload.get("type") == "message_delta":
            return usage_of(payload.get("usage"), so_far) or so_far
        return so_far

    def final(self, payload: Any) -> bool:
        return isinstance(payload, dict) and payload.get("type") == "message_delta"

    def text(self, payload: Any) -> str:
        return generated_text(payload)

    def model(self, payload: Any) -> str | None:
        return answered_model(payload)

    def ends(self, data: str, payload: Any) -> str | None:
        if isinstance(payload, dict) and payload.get("type") == "message_stop":
            return "before"
        return None

    def gate_only(self, payload: Any) -> bool:
        return False


def rfc3339(epoch: float) -> str:
    moment = datetime.datetime.fromtimestamp(math.ceil(epoch), datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class Anthropic:
    name = "anthropic"
    estimate_has_margin = True  # PROMPT_MARGIN
    served = "the messages endpoint (and messages/count_tokens) and the model list"
    credential_headers = keys.CREDENTIAL_HEADERS
    stream = AnthropicStream()

    def caller_key(self, headers: Mapping[str, str]) -> str | None:
        return keys.caller_key(headers)

    def provider_auth(self, api_key: str) -> dict[str, str]:
        return {"x-api-key": api_key}

    def classify(self, method: str, segments: list[str]) -> Endpoint:
        if segments[:1] == ["v1"]:
            segments = segments[1:]
        name = "/".join(segments)
        if method == "POST" and name == METERED_ENDPOINT:
            return Endpoint(name, True)
        if method == "POST" and name in UNMETERED_POSTS:
            return Endpoint(None, True)
        read_only = bool(segments) and segments[0] in READ_ONLY_ENDPOINTS and len(segments) <= 2
        return Endpoint(None, method == "GET" and read_only)

    def terms(
        self,
        endpoint: str,
        body: dict[str, Any],
        default_reserve: int,
        deployment: str | None = None,
    ) -> RequestTerms:
        limit = body.get("max_tokens")
        if not whole_number(limit, 1):
            raise BodyRefused("max_tokens: a whole number of at least 1 is required")
        return RequestTerms(
            model=model_of(body), stream=body.get("stream") is True, completion_reserve=limit
        )

    def estimate_prompt(self, endpoint: str, body: dict[str, Any], exact_chars: int) -> int:
        return estimate_prompt(body, exact_chars)

    def adjust(
        self, endpoint: str, body: dict[str, Any], reserved: Usage, strict: bool = False
    ) -> dict[str, Any]:
        """A `max_tokens` above what was reserved is lowered to it (at least 1); the answer then
        ends with stop_reason `max_tokens`. Streams always report usage: nothing to ask. Every
        admitted body carries `max_tokens` (Anthropic requires it), so the completion is always
        bounded and `strict` adds nothing."""
        limit = body.get("max_tokens")
        if whole_number(limit) and limit > reserved.completion:
            body["max_tokens"] = max(1, reserved.completion)
            return {"max_tokens_requested": limit, "max_tokens_lowered_to": body["max_tokens"]}
        return {}

    def as_requested(self, body: dict[str, Any], notes: Mapping[str, Any]) -> None:
        requested = notes.get("max_tokens_requested")
        if whole_number(requested) and "max_tokens" in body:
            body["max_tokens"] = requested

    def usage(self, payload: Any) -> Usage | None:
        return usage_of(payload.get("usage")) if isinstance(payload, dict) else None

    def text(self, payload: Any) -> str:
        return generated_text(payload)

    def model(self, payload: Any) -> str | None:
        return answered_model(payload)

    def error_body(self, message: str, type_: str, code: str | None) -> bytes:
        kind = ERROR_TYPES.get(code or "")
        if kind is None:
            kind = "overloaded_error" if type_ == "server_error" else "invalid_request_error"
        return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()

    def ratelimit_headers(self, statuses: Sequence[LimitStatus], now: float) -> dict[str, str]:
        """Anthropic's own `anthropic-ratelimit-*` headers for the gate's limits: `tokens` the
        most restrictive token limit, `input-tokens` / `output-tokens` the prompt and
        completion limits, `requests` the request limits; resets in RFC 3339."""
        headers: dict[str, str] = {}
        groups = {
            "tokens": [s for s in statuses if s.limit.dimension != REQUESTS],
            "input-tokens": [s for s in statuses if s.limit.dimension == "prompt_tokens"],
            "output-tokens": [s for s in statuses if s.limit.dimension == "completion_tokens"],
            "requests": [s for s in statuses if s.limit.dimension == REQUESTS],
        }
        for kind, group in groups.items():
            chosen = most_restrictive(group)
            if chosen is not None:
                prefix = f"anthropic-ratelimit-{kind}"
                headers[f"{prefix}-limit"] = str(chosen.limit.count)
                headers[f"{prefix}-remaining"] = str(chosen.remaining)
                headers[f"{prefix}-reset"] = rfc3339(max(chosen.reset_at, now))
        return headers


ANTHROPIC = Anthropic()  # stateless: every provider of kind anthropic shares it
