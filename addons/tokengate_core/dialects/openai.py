"""OpenAI's API (and the OpenAI-compatible servers that copy it): chat/completions, completions,
embeddings and responses are metered; the model list is read-only; everything else is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .. import keys, tokens
from ..limiter import LimitStatus, Usage, whole_number
from ..tokens import PromptCounter
from . import base
from .base import Endpoint, RequestTerms

# Endpoints whose answers report token usage (POST).
METERED_ENDPOINTS = ("chat/completions", "completions", "embeddings", "responses")
# What else a caller may do with the provider's key: read the model list. Everything else
# (files, batches, fine-tunes, images, audio, realtime, deletes) would spend or expose the
# provider account without being metered, so the gate refuses it.
READ_ONLY_ENDPOINTS = ("models",)
MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# The field a strict proxy sets where the caller set none: each endpoint's current one
# (OpenAI's reasoning models refuse `max_tokens` on chat/completions).
BOUND_FIELD = {
    "chat/completions": "max_completion_tokens",
    "completions": "max_tokens",
    "responses": "max_output_tokens",
}
# Streamed endpoints that report usage only when asked (`stream_options.include_usage`).
USAGE_ON_REQUEST_ENDPOINTS = ("chat/completions", "completions")
# Most completions one request is reserved for (`n`, `best_of`, prompts in a list): far above
# OpenAI's own maximum `n` (128); it only keeps the reserve of an absurd request bounded.
MAX_COMPLETIONS = 4096
# A reported figure above this is not believed (no model produces ten million tokens at once).
MAX_BELIEVABLE_TOKENS = 10_000_000
# The Responses API ends a stream with one of these (it sends no `[DONE]`); each carries usage.
TERMINAL_RESPONSE_EVENTS = ("response.completed", "response.failed", "response.incomplete")

# OpenAI's chat format: every message costs a few tokens of framing, and the reply is primed
# with <|start|>assistant<|message|> (see OpenAI's cookbook "How to count tokens").
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_REPLY_PRIMING = 3
# An image part cannot be tokenized as text; OpenAI bills a low-detail image at 85 tokens.
TOKENS_PER_IMAGE = 85
IMAGE_TYPES = ("image_url", "input_image", "image")


def believable(value: Any) -> int | None:
    """A reported token count, or None for one that is missing, negative or absurd."""
    return value if whole_number(value) and value <= MAX_BELIEVABLE_TOKENS else None


def model_of(body: dict) -> str | None:
    """The model a request names, if it names one as text."""
    model = body.get("model")
    return model if isinstance(model, str) else None


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


# --- prompt estimate -------------------------------------------------------------------------


def _text_of(value: Any) -> Iterable[str]:
    """Every string a prompt value carries, whatever the shape (str, parts list, dicts)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _text_of(item)
    elif isinstance(value, dict):
        if value.get("type") in IMAGE_TYPES:
            return
        for key in ("text", "content", "input", "output", "arguments", "refusal"):
            if key in value:
                yield from _text_of(value[key])


def _images_in(value: Any) -> int:
    if isinstance(value, list):
        return sum(_images_in(item) for item in value)
    if isinstance(value, dict):
        if value.get("type") in IMAGE_TYPES:
            return 1
        return _images_in(value.get("content"))
    return 0


def _count_parts(value: Any, count: PromptCounter) -> int:
    return sum(count(text) for text in _text_of(value)) + TOKENS_PER_IMAGE * _images_in(value)


def _count_tools(body: dict, count: PromptCounter) -> int:
    """Tool and function definitions are part of the prompt; count their JSON text."""
    total = 0
    for key in ("tools", "functions", "response_format", "text"):
        value = body.get(key)
        if isinstance(value, (list, dict)) and value:
            total += count(json.dumps(value, separators=(",", ":")))
    return total


def _count_messages(messages: Any, count: PromptCounter) -> int:
    if not isinstance(messages, list):
        return _count_parts(messages, count)
    total = TOKENS_REPLY_PRIMING
    for message in messages:
        total += TOKENS_PER_MESSAGE
        if not isinstance(message, dict):
            total += _count_parts(message, count)
            continue
        total += _count_parts(message.get("content"), count)
        if isinstance(message.get("role"), str):
            total += count(message["role"])
        if isinstance(message.get("name"), str):
            total += TOKENS_PER_NAME + count(message["name"])
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict):
                total += count(json.dumps(call.get("function", call)))
    return total


def _count_token_arrays_or_text(value: Any, count: PromptCounter) -> int:
    """`prompt` / `input` may be text, a list of texts, token ids, or lists of token ids."""
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return len(value)
    if isinstance(value, list):
        return sum(_count_token_arrays_or_text(item, count) for item in value)
    return _count_parts(value, count)


def estimate_prompt(endpoint: str, body: dict, exact_chars: int = tokens.EXACT_PROMPT_CHARS) -> int:
    """The prompt tokens a request will be billed for, estimated before it is sent: exact up
    to `exact_chars` characters of text, an upper bound beyond (see PromptCounter)."""
    count = PromptCounter(model_of(body), exact_chars)
    if endpoint == "chat/completions":
        return _count_messages(body.get("messages"), count) + _count_tools(body, count)
    if endpoint == "responses":
        total = _count_parts(body.get("instructions"), count)
        items = body.get("input")
        if isinstance(items, list):
            total += _count_messages(items, count)
        else:
            total += _count_parts(items, count)
        return total + _count_tools(body, count)
    if endpoint == "completions":
        return _count_token_arrays_or_text(body.get("prompt"), count)
    if endpoint == "embeddings":
        return _count_token_arrays_or_text(body.get("input"), count)
    return 0


# --- usage ------------------------------------------------------------------------------------


def reported_usage(payload: Any) -> Usage | None:
    """`usage` as chat/completions/embeddings or the Responses API report it; None if absent."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        response = payload.get("response")  # Responses API stream events wrap the response
        return reported_usage(response) if isinstance(response, dict) else None
    prompt = believable(usage.get("prompt_tokens", usage.get("input_tokens")))
    completion = believable(usage.get("completion_tokens", usage.get("output_tokens", 0)))
    if prompt is None or completion is None:
        return None
    cached = _detail(usage, ("prompt_tokens_details", "input_tokens_details"), "cached_tokens")
    reasoning = _detail(
        usage, ("completion_tokens_details", "output_tokens_details"), "reasoning_tokens"
    )
    tier = payload.get("service_tier")  # "default", "flex", "priority", ...: priced apart
    tier = tier if isinstance(tier, str) and tier else None
    return Usage(
        prompt, completion, min(cached, prompt), 0, min(reasoning, completion), service_tier=tier
    )


def _detail(usage: dict, holders: tuple[str, ...], field: str) -> int:
    """A sub-count from `usage`'s details object (chat or Responses API naming); 0 if absent
    or not believable."""
    for holder in holders:
        details = usage.get(holder)
        if isinstance(details, dict):
            return believable(details.get(field)) or 0
    return 0


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


def answered_model(payload: Any) -> str | None:
    """The model an answer or a stream event names (the Responses API's events wrap it)."""
    return base.answered_model(payload, "response")


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


class OpenAIStream:
    """Chat/completions chunks end with `data: [DONE]`, the gate's trailer before it; Responses
    API events end with a terminal event that carries usage, the trailer after it."""

    def usage(self, payload: Any, so_far: Usage | None) -> Usage | None:
        return reported_usage(payload) or so_far

    def final(self, payload: Any) -> bool:
        return True  # usage comes once, whole

    def text(self, payload: Any) -> str:
        return generated_text(payload)

    def model(self, payload: Any) -> str | None:
        return answered_model(payload)

    def ends(self, data: str, payload: Any) -> str | None:
        if is_done(data):
            return "before"
        if is_terminal_response_event(payload):
            return "after"
        return None

    def gate_only(self, payload: Any) -> bool:
        return is_usage_only_chunk(payload)


class OpenAI:
    name = "openai"
    estimate_has_margin = False
    served = (
        "the chat/completions, completions, embeddings and responses endpoints and the model list"
    )
    credential_headers = keys.CREDENTIAL_HEADERS
    stream = OpenAIStream()

    def caller_key(self, headers: Mapping[str, str]) -> str | None:
        return keys.caller_key(headers)

    def provider_auth(self, api_key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"}

    def classify(self, method: str, segments: list[str]) -> Endpoint:
        if segments[:1] == ["v1"]:
            segments = segments[1:]
        name = "/".join(segments)
        if method == "POST" and name in METERED_ENDPOINTS:
            return Endpoint(name, True)
        read_only = bool(segments) and segments[0] in READ_ONLY_ENDPOINTS and len(segments) <= 2
        return Endpoint(None, method == "GET" and read_only)

    def terms(
        self,
        endpoint: str,
        body: dict[str, Any],
        default_reserve: int,
        deployment: str | None = None,
    ) -> RequestTerms:
        """The model is the body's (OpenAI's paths name no deployment)."""
        return RequestTerms(
            model=model_of(body),
            stream=body.get("stream") is True,
            completion_reserve=completion_reserve(body, endpoint, default_reserve),
            completions=completions_requested(body, endpoint),
            service_tier=tier
            if isinstance(tier := body.get("service_tier"), str) and tier
            else None,
        )

    def estimate_prompt(self, endpoint: str, body: dict[str, Any], exact_chars: int) -> int:
        return estimate_prompt(endpoint, body, exact_chars)

    def adjust(
        self, endpoint: str, body: dict[str, Any], reserved: Usage, strict: bool = False
    ) -> dict[str, Any]:
        """A `max_tokens` above what is left of the budget (shared by the `n` completions) is
        lowered to it (at least 1), so a burst with `max_tokens` cannot overspend; the answer
        then ends with finish_reason `length`. The caller's own value is noted too, for replay
        and audit. `strict`: a request without one gets the endpoint's field, set to what was
        reserved. A stream the caller did not ask usage of is asked for it."""
        notes: dict[str, Any] = {}
        field = max_tokens_field(body)
        per_completion = reserved.completion // completions_requested(body, endpoint)
        if strict and field is None and endpoint in BOUND_FIELD:
            field, notes["max_tokens_added"] = BOUND_FIELD[endpoint], True
            body[field] = notes["max_tokens_lowered_to"] = max(1, per_completion)
        elif endpoint != "embeddings" and field is not None and body[field] > per_completion:
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

    def as_requested(self, body: dict[str, Any], notes: Mapping[str, Any]) -> None:
        field = max_tokens_field(body)
        requested = notes.get("max_tokens_requested")
        if field is not None and notes.get("max_tokens_added"):
            del body[field]
        elif field is not None and whole_number(requested):
            body[field] = requested

    def usage(self, payload: Any) -> Usage | None:
        return reported_usage(payload)

    def text(self, payload: Any) -> str:
        return generated_text(payload)

    def model(self, payload: Any) -> str | None:
        return answered_model(payload)

    def error_body(self, message: str, type_: str, code: str | None) -> bytes:
        payload = {"error": {"message": message, "type": type_, "param": None, "code": code}}
        return json.dumps(payload).encode()

    def ratelimit_headers(self, statuses: Sequence[LimitStatus], now: float) -> dict[str, str]:
        return {}  # the gate's x-ratelimit-* headers are OpenAI's own


OPENAI = OpenAI()  # stateless: every provider of kind openai shares it
