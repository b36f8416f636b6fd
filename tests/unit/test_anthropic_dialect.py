"""The Anthropic dialect's rules on request bodies, answers and streams (no proxy needed)."""

from __future__ import annotations

import base64
import json
import math
import struct
from types import SimpleNamespace

import pytest
from mitmproxy.http import Headers
from tokengate_core import answers, tokens
from tokengate_core.config import load_config
from tokengate_core.dialects import DIALECTS
from tokengate_core.dialects.anthropic import (
    MAX_IMAGE_TOKENS,
    MAX_PDF_PAGES,
    PROMPT_MARGIN,
    TOKENS_PER_PDF_PAGE,
    Anthropic,
    image_tokens,
    pdf_tokens,
)
from tokengate_core.dialects.base import BodyRefused
from tokengate_core.dialects.openai import OpenAI
from tokengate_core.keys import ConflictingKeys
from tokengate_core.limiter import Bucket, Charge, Demand, Limit, LimitStatus, Usage, decide
from tokengate_core.streaming import StreamRelay
from tokengate_core.tools import mock_anthropic
from tokengate_core.tools.mock import Completion, completion_pieces, render
from tokengate_core.usage import StreamMeter, meter_json
from tokengate_core.yamlsource import ConfigError

ANTHROPIC = Anthropic()
MODEL = "claude-sonnet-4-5"
LONG = "The quick brown fox jumps over the lazy dog. " * 40


def png(width: int, height: int) -> str:
    head = b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sII", 13, b"IHDR", width, height)
    return base64.b64encode(head + b"\x00" * 64).decode()


def test_anthropic_is_registered_by_its_kind():
    assert isinstance(DIALECTS["anthropic"].make(), Anthropic)
    assert ANTHROPIC.name == "anthropic"


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "v1/messages", ("messages", True)),
        ("POST", "messages", ("messages", True)),
        ("POST", "v1/messages/count_tokens", (None, True)),
        ("GET", "v1/models", (None, True)),
        ("GET", "v1/models/claude-sonnet-4-5", (None, True)),
        ("GET", "v1/messages", (None, False)),
        ("POST", "v1/messages/batches", (None, False)),
        ("POST", "v1/files", (None, False)),
        ("DELETE", "v1/models/x", (None, False)),
        ("POST", "v1/chat/completions", (None, False)),
    ],
)
def test_classify(method, path, expected):
    assert ANTHROPIC.classify(method, path.split("/")) == (*expected, None)


def test_caller_key_in_x_api_key_or_bearer_and_conflicts_refused():
    assert ANTHROPIC.caller_key(Headers(x_api_key="tg-a")) == "tg-a"
    assert ANTHROPIC.caller_key(Headers(authorization="Bearer tg-a")) == "tg-a"
    assert ANTHROPIC.caller_key(Headers(authorization="Bearer tg-a", x_api_key="tg-a")) == "tg-a"
    with pytest.raises(ConflictingKeys):
        ANTHROPIC.caller_key(Headers(authorization="Bearer tg-a", x_api_key="tg-b"))
    assert ANTHROPIC.provider_auth("sk-ant") == {"x-api-key": "sk-ant"}
    assert {"authorization", "x-api-key"} <= set(ANTHROPIC.credential_headers)


@pytest.mark.parametrize("value", [None, 0, -1, True, "100", 1.5])
def test_max_tokens_is_required(value):
    body = {"model": MODEL, "messages": []} | ({} if value is None else {"max_tokens": value})
    with pytest.raises(BodyRefused, match="max_tokens"):
        ANTHROPIC.terms("messages", body, 256)


def test_terms_reserve_max_tokens_exactly():
    terms = ANTHROPIC.terms("messages", {"model": MODEL, "max_tokens": 700, "stream": True}, 256)
    assert (terms.model, terms.stream, terms.completion_reserve) == (MODEL, True, 700)


def _o200k(text: str) -> int:
    return tokens.count_text(text, MODEL)


def test_estimate_counts_system_messages_tool_blocks_and_tools_with_the_margin():
    tool = {"name": "get_weather", "input_schema": {"type": "object"}}
    body = {
        "model": MODEL,
        "max_tokens": 10,
        "system": [{"type": "text", "text": LONG}],
        "messages": [
            {"role": "user", "content": "What is the weather?"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "Sunny"}],
            },
        ],
        "tools": [tool],
    }
    texts = [LONG, "What is the weather?", "get_weather", "{}", "Sunny"]
    counted = sum(_o200k(t) for t in texts) + _o200k(json.dumps([tool], separators=(",", ":")))
    expected = math.ceil(counted * PROMPT_MARGIN) + 10 + 5 * 3
    assert ANTHROPIC.estimate_prompt("messages", body, tokens.EXACT_PROMPT_CHARS) == expected


def test_documents_as_text_are_counted_as_text():
    document = {"type": "document", "source": {"type": "text", "data": LONG}, "title": "Fox"}
    body = {"messages": [{"role": "user", "content": [document]}]}
    counted = _o200k(LONG) + _o200k("Fox")
    assert (
        ANTHROPIC.estimate_prompt("messages", body, 10**6)
        == math.ceil(counted * PROMPT_MARGIN) + 10 + 5
    )


def test_images_are_bounded_from_their_size():
    assert image_tokens({"type": "base64", "data": png(200, 150)}) == 40  # 30,000 px / 750
    assert image_tokens({"type": "base64", "data": png(4000, 4000)}) == MAX_IMAGE_TOKENS
    assert image_tokens({"type": "url", "url": "https://x/y.jpg"}) == MAX_IMAGE_TOKENS
    assert image_tokens({"type": "base64", "data": "not base64!"}) == MAX_IMAGE_TOKENS
    block = {"type": "image", "source": {"type": "base64", "data": png(200, 150)}}
    body = {"messages": [{"role": "user", "content": [block]}]}
    assert ANTHROPIC.estimate_prompt("messages", body, 10**6) == 10 + 5 + 40


def test_pdfs_are_bounded_by_their_pages():
    pdf = b"%PDF-1.4\n" + b"1 0 obj << /Type /Page >> endobj\n" * 3 + b"<< /Type /Pages >>"
    source = {"type": "base64", "data": base64.b64encode(pdf).decode()}
    assert pdf_tokens(source) == 3 * TOKENS_PER_PDF_PAGE
    assert pdf_tokens({"type": "url", "url": "https://x/y.pdf"}) == (
        MAX_PDF_PAGES * TOKENS_PER_PDF_PAGE
    )


ENGLISH_BODIES = [
    {"messages": [{"role": "user", "content": "Hello!"}]},
    {"system": LONG, "messages": [{"role": "user", "content": LONG}]},
    {
        "system": [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Summarise."}]}],
        "tools": [{"name": "lookup", "description": LONG, "input_schema": {"type": "object"}}],
    },
]


@pytest.mark.parametrize("body", ENGLISH_BODIES)
def test_estimate_is_above_what_the_mock_bills(body):
    estimate = ANTHROPIC.estimate_prompt("messages", body, tokens.EXACT_PROMPT_CHARS)
    assert estimate >= mock_anthropic.billed_prompt(body)[0]


def test_adjust_lowers_max_tokens_to_the_reservation_and_replay_restores_it():
    body = {"max_tokens": 1000}
    notes = ANTHROPIC.adjust("messages", body, Usage(10, 300))
    assert body == {"max_tokens": 300}
    assert notes == {"max_tokens_requested": 1000, "max_tokens_lowered_to": 300}
    ANTHROPIC.as_requested(body, notes)
    assert body == {"max_tokens": 1000}
    assert ANTHROPIC.adjust("messages", {"max_tokens": 5}, Usage(10, 300)) == {}
    zero = {"max_tokens": 5}
    ANTHROPIC.adjust("messages", zero, Usage(10, 0))
    assert zero == {"max_tokens": 1}


def test_json_usage_adds_cache_writes_and_reads_to_the_prompt():
    usage = {
        "input_tokens": 10,
        "cache_creation_input_tokens": 200,
        "cache_read_input_tokens": 3000,
        "output_tokens": 7,
    }
    assert ANTHROPIC.usage({"usage": usage}) == Usage(3210, 7, cached_prompt=3000, cache_write=200)
    nulls = {**usage, "cache_creation_input_tokens": None, "cache_read_input_tokens": None}
    assert ANTHROPIC.usage({"usage": nulls}) == Usage(10, 7)
    for bad in (-1, 1.5, "7", 10**15, None):
        assert ANTHROPIC.usage({"usage": {**usage, "output_tokens": bad}}) is None
    assert ANTHROPIC.usage({"usage": {**usage, "cache_read_input_tokens": -3}}) is None


def test_a_json_answer_without_usage_counts_its_text_and_tool_input():
    answer = {
        "content": [
            {"type": "text", "text": "Hello there"},
            {"type": "tool_use", "name": "f", "input": {"city": "Paris"}},
        ]
    }
    metered = meter_json(ANTHROPIC, json.dumps(answer).encode(), 42, MODEL)
    expected = tokens.count_text('Hello there{"city":"Paris"}', MODEL)
    assert (metered.usage, metered.source) == (Usage(42, expected), "estimated")


# --- streams ----------------------------------------------------------------------------------


def stream_of(n: int = 24, tool: str | None = None, cache=(100, 0), report=True) -> bytes:
    completion = Completion(MODEL, completion_pieces(MODEL, n), "stop", 150, n, report)
    events = mock_anthropic.Message(completion, tool, cache).events()
    return b"".join(render(event) for event in events)


TRAILER = b": x-tokens-consumed=T\n\n"


def relay(chunks: list[bytes]) -> tuple[bytes, StreamRelay]:
    relay = StreamRelay(StreamMeter(ANTHROPIC.stream, 999, MODEL), False, lambda _: TRAILER)
    out = b"".join(b"".join(relay(chunk)) for chunk in [*chunks, b""])
    return out, relay


def test_stream_usage_is_message_start_prompt_plus_last_cumulative_output():
    out, relayed = relay([stream_of()])
    metered = relayed.result()
    # 50 uncached + 100 written to the cache; 24 output (message_start's placeholder 1 not added)
    assert metered.usage == Usage(150, 24, cache_write=100)
    assert metered.source == "reported"
    assert out.endswith(TRAILER + b"event: message_stop\n" + b'data: {"type":"message_stop"}\n\n')
    assert out.count(TRAILER) == 1


def test_stream_split_at_every_byte_meters_and_relays_the_same():
    payload = stream_of(n=16, tool="lookup", cache=(0, 100))
    whole, _ = relay([payload])
    for cut in range(len(payload) + 1):
        out, relayed = relay([payload[:cut], payload[cut:]])
        assert out == whole, f"split at byte {cut}"
        assert relayed.result().usage == Usage(150, 16, cached_prompt=100), f"split at {cut}"


def test_a_stream_cut_after_message_start_is_charged_its_prompt_and_what_streamed():
    payload = stream_of(n=40)
    cut = payload.index(b"event: content_block_stop")
    _, relayed = relay([payload[:cut]])
    streamed = "".join(completion_pieces(MODEL, 40))
    expected = Usage(150, tokens.count_text(streamed, MODEL), cache_write=100)
    assert (relayed.result().usage, relayed.result().source) == (expected, "estimated")


def test_a_stream_without_usage_is_estimated_from_the_prompt_estimate():
    _, relayed = relay([stream_of(n=8, report=False)])
    assert relayed.result().usage == Usage(999, 8)
    assert relayed.result().source == "estimated"


def test_message_delta_with_cumulative_input_figures_replaces_them():
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 5, "output_tokens": 1}}}
    so_far = ANTHROPIC.stream.usage(start, None)
    assert so_far == Usage(5, 1) and not ANTHROPIC.stream.final(start)
    delta = {"type": "message_delta", "usage": {"output_tokens": 9}}
    assert ANTHROPIC.stream.usage(delta, so_far) == Usage(5, 9)
    full = {"type": "message_delta", "usage": {"input_tokens": 8, "output_tokens": 9}}
    assert ANTHROPIC.stream.usage(full, so_far) == Usage(8, 9)
    assert ANTHROPIC.stream.final(delta)
    assert ANTHROPIC.stream.usage({"type": "message_delta", "usage": None}, so_far) == so_far


# --- answers the gate makes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "status", "kind"),
    [
        (answers.missing_key(ANTHROPIC), 401, "authentication_error"),
        (answers.conflicting_keys(ANTHROPIC, ["X-API-Key", "Authorization"]), 401, None),
        (answers.endpoint_not_allowed(ANTHROPIC, "POST", "/v1/files"), 403, "permission_error"),
        (answers.unpriced(ANTHROPIC, "claude", "claude-next"), 403, "permission_error"),
        (answers.unknown_context(ANTHROPIC, "/x", ["/claude"]), 404, "not_found_error"),
        (answers.unreadable_body(ANTHROPIC, "bad"), 400, "invalid_request_error"),
        (answers.invalid_body(ANTHROPIC, "max_tokens"), 400, "invalid_request_error"),
        (answers.too_large(ANTHROPIC, 10), 413, "request_too_large"),
        (answers.store_unavailable(ANTHROPIC, 2), 503, "overloaded_error"),
    ],
)
def test_gate_answers_are_anthropic_shaped(answer, status, kind):
    body = json.loads(answer.content)
    assert answer.status_code == status and body["type"] == "error"
    assert body["error"]["type"] == (kind or "authentication_error")
    assert body["error"]["message"]
    assert answer.headers["X-TokenGate-Source"] == "gateway"


def _status(dimension: str, count: int, used: int, reset_at: float) -> LimitStatus:
    return LimitStatus(Limit(dimension, count, 60, "1m"), used, 0, reset_at)


def test_anthropic_ratelimit_headers_for_the_gates_limits():
    statuses = (
        _status("total_tokens", 1000, 900, 1_800_000_030.2),
        _status("prompt_tokens", 5000, 100, 1_800_000_010),
        _status("requests", 50, 10, 1_800_000_020),
    )
    headers = answers.ratelimit_headers(statuses, 1_800_000_000, dialect=ANTHROPIC)
    assert headers["anthropic-ratelimit-tokens-limit"] == "1000"
    assert headers["anthropic-ratelimit-tokens-remaining"] == "100"
    assert headers["anthropic-ratelimit-tokens-reset"] == "2027-01-15T08:00:31Z"
    assert headers["anthropic-ratelimit-input-tokens-remaining"] == "4900"
    assert headers["anthropic-ratelimit-requests-remaining"] == "40"
    assert "anthropic-ratelimit-output-tokens-limit" not in headers
    assert headers["x-ratelimit-remaining-tokens"] == "100"  # the gate's own, as for every API
    assert OpenAI().ratelimit_headers(statuses, 1_800_000_000) == {}


def test_the_gates_429_is_anthropic_shaped_with_retry_after_and_anthropic_headers():
    limit = Limit("total_tokens", 100, 60, "1m")
    charges = [Charge(1000.0, 100, settled=True)]
    decision = decide([(Bucket("alice", limit), charges)], Demand(10, 5), 1030.0)
    proxy = SimpleNamespace(name="claude", scope="key")
    answer = answers.rate_limited(ANTHROPIC, decision, 1030.0, proxy, Demand(15, 0))
    body = json.loads(answer.content)
    assert answer.status_code == 429
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["message"].startswith("Rate limit reached for proxy 'claude'")
    assert answer.headers["retry-after"] == "30"
    assert answer.headers["anthropic-ratelimit-tokens-remaining"] == "0"
    assert answer.headers["anthropic-ratelimit-tokens-reset"] == "1970-01-01T00:17:40Z"


# --- quotas.yaml --------------------------------------------------------------------------------

QUOTAS = """\
providers:
  anthropic:
    kind: anthropic
    base_url: https://api.anthropic.com
    api_key_env: TG_TEST_ANTHROPIC_KEY
    hosts: [api.anthropic.com]
  openai:
    base_url: https://api.openai.com/v1
    api_key_env: TG_TEST_ANTHROPIC_KEY
    hosts: [api.openai.com]
proxies:
  claude:
    context: /claude
    provider: anthropic
    token_limits:
      total_tokens:
        - {count: 100, duration: 1m}
    keys: {}
"""


def test_a_provider_of_kind_anthropic_speaks_anthropic(tmp_path, monkeypatch):
    monkeypatch.setenv("TG_TEST_ANTHROPIC_KEY", "sk-ant")
    path = tmp_path / "quotas.yaml"
    path.write_text(QUOTAS, encoding="utf-8")
    config = load_config(path)
    assert config.proxies["claude"].dialect is DIALECTS["anthropic"].make()
    assert config.providers["openai"].dialect is DIALECTS["openai"].make()


def test_providers_of_different_kinds_may_not_share_a_host(tmp_path, monkeypatch):
    monkeypatch.setenv("TG_TEST_ANTHROPIC_KEY", "sk-ant")
    path = tmp_path / "quotas.yaml"
    path.write_text(QUOTAS.replace("[api.openai.com]", "[api.anthropic.com]"), encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.line == 10
    assert "a host of provider 'anthropic', which speaks anthropic, not openai" in str(raised.value)
