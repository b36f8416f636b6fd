"""The OpenAI dialect's rules on request bodies and answers, one by one (no proxy needed)."""

from __future__ import annotations

import json

import pytest
from mitmproxy.http import Headers
from tokengate_core import tokens
from tokengate_core.dialects import DEFAULT, DIALECTS
from tokengate_core.dialects.openai import (
    MAX_COMPLETIONS,
    OpenAI,
    completion_reserve,
    completions_requested,
    estimate_prompt,
    max_tokens_field,
)
from tokengate_core.keys import ConflictingKeys
from tokengate_core.limiter import Usage

OPENAI = OpenAI()
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}


def test_openai_is_the_default_dialect():
    assert DEFAULT == "openai" and isinstance(DIALECTS[DEFAULT].make(), OpenAI)
    assert OPENAI.name == "openai"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_tokens": 5}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_output_tokens": 7}, "max_output_tokens"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),  # the first one set
        ({"max_tokens": -1, "max_output_tokens": 3}, "max_output_tokens"),
        ({"max_tokens": True}, None),
        ({"max_tokens": "5"}, None),
        ({}, None),
    ],
)
def test_max_tokens_field(body, field):
    assert max_tokens_field(body) == field


@pytest.mark.parametrize(
    ("endpoint", "body", "count"),
    [
        ("chat/completions", {"n": 3}, 3),
        ("chat/completions", {"n": 0}, 1),  # invalid: the provider refuses it
        ("chat/completions", {"n": True}, 1),
        ("chat/completions", {"n": 10**9}, MAX_COMPLETIONS),
        ("completions", {"prompt": "a", "n": 2, "best_of": 5}, 5),
        ("completions", {"prompt": "a", "n": 4, "best_of": 2}, 4),
        ("completions", {"prompt": ["a", "b", "c"], "n": 2}, 6),
        ("completions", {"prompt": [1, 2, 3]}, 1),  # one prompt of token ids
        ("completions", {"prompt": [[1, 2], [3]]}, 2),
        ("completions", {"prompt": []}, 1),
        ("responses", {"n": 5}, 1),
        ("embeddings", {"n": 5}, 1),
    ],
)
def test_completions_requested(endpoint, body, count):
    assert completions_requested(body, endpoint) == count


@pytest.mark.parametrize(
    ("endpoint", "body", "reserve"),
    [
        ("chat/completions", {}, 256),
        ("chat/completions", {"max_tokens": 10}, 10),
        ("chat/completions", {"max_tokens": 10, "n": 3}, 30),
        ("chat/completions", {"n": 2}, 512),
        ("responses", {"max_output_tokens": 7}, 7),
        ("embeddings", {"max_tokens": 10}, 0),  # embeddings produce no completion
    ],
)
def test_completion_reserve(endpoint, body, reserve):
    assert completion_reserve(body, endpoint, 256) == reserve


def test_terms():
    terms = OPENAI.terms("chat/completions", {**CHAT, "stream": True, "max_tokens": 9}, 256)
    assert (terms.model, terms.stream, terms.completion_reserve) == ("gpt-4o", True, 9)
    terms = OPENAI.terms("chat/completions", {"model": 4, "stream": "yes"}, 100)
    assert (terms.model, terms.stream, terms.completion_reserve) == (None, False, 100)


def test_adjust_lowers_max_tokens_to_what_was_reserved_per_completion():
    body = {**CHAT, "max_tokens": 500, "n": 2}
    notes = OPENAI.adjust("chat/completions", body, Usage(9, 101))
    assert notes == {"max_tokens_requested": 500, "max_tokens_lowered_to": 50}
    assert body["max_tokens"] == 50


def test_adjust_keeps_a_max_tokens_that_fits_and_never_lowers_below_one():
    fits = {**CHAT, "max_tokens": 50}
    assert OPENAI.adjust("chat/completions", fits, Usage(9, 50)) == {}
    assert fits["max_tokens"] == 50
    starved = {**CHAT, "max_completion_tokens": 50}
    notes = OPENAI.adjust("chat/completions", starved, Usage(9, 0))
    assert notes["max_tokens_lowered_to"] == 1 == starved["max_completion_tokens"]


def test_adjust_leaves_embeddings_and_bodies_without_a_limit_alone():
    embedding = {"model": "e", "input": "x", "max_tokens": 50}
    assert OPENAI.adjust("embeddings", embedding, Usage(1, 0)) == {}
    assert embedding["max_tokens"] == 50
    assert OPENAI.adjust("chat/completions", dict(CHAT), Usage(9, 0)) == {}


@pytest.mark.parametrize(
    ("endpoint", "body", "field", "bound"),
    [
        ("chat/completions", {**CHAT, "n": 2}, "max_completion_tokens", 50),
        ("completions", {"model": "m", "prompt": "x"}, "max_tokens", 101),
        ("responses", {"model": "m", "input": "x"}, "max_output_tokens", 101),
    ],
)
def test_strict_bounds_a_body_that_set_no_max_tokens_with_its_endpoints_field(
    endpoint, body, field, bound
):
    notes = OPENAI.adjust(endpoint, body, Usage(9, 101), strict=True)
    assert body[field] == bound == notes["max_tokens_lowered_to"]
    assert notes["max_tokens_added"] is True
    OPENAI.as_requested(body, notes)  # replay reads the body as its caller sent it
    assert field not in body


def test_strict_lowers_a_larger_max_tokens_as_without_it():
    body = {**CHAT, "max_tokens": 500}
    assert OPENAI.adjust("chat/completions", body, Usage(9, 101), strict=True) == {
        "max_tokens_requested": 500,
        "max_tokens_lowered_to": 101,
    }
    embedding = {"model": "e", "input": "x"}
    assert OPENAI.adjust("embeddings", embedding, Usage(1, 0), strict=True) == {}


@pytest.mark.parametrize(
    ("endpoint", "extra", "injected"),
    [
        ("chat/completions", {"stream": True}, {"include_usage": True}),
        ("completions", {"stream": True}, {"include_usage": True}),
        (
            "chat/completions",
            {"stream": True, "stream_options": {"x": 1}},
            {"x": 1, "include_usage": True},
        ),
        (
            "chat/completions",
            {"stream": True, "stream_options": {"include_usage": False}},
            {"include_usage": True},
        ),
        ("chat/completions", {"stream": True, "stream_options": {"include_usage": True}}, None),
        ("chat/completions", {"stream": True, "stream_options": "odd"}, None),
        ("chat/completions", {"stream": "true"}, None),
        ("chat/completions", {}, None),
        ("responses", {"stream": True}, None),  # its terminal event always carries usage
    ],
)
def test_adjust_asks_a_stream_for_usage_unless_the_caller_did(endpoint, extra, injected):
    body = {**CHAT, **extra}
    before = json.dumps(body)
    notes = OPENAI.adjust(endpoint, body, Usage(9, 100))
    if injected is None:
        assert notes == {} and json.dumps(body) == before
    else:
        assert notes == {"usage_injected": True} and body["stream_options"] == injected


def test_as_requested_puts_back_the_callers_max_tokens():
    body = {**CHAT, "max_output_tokens": 50}
    OPENAI.as_requested(body, {"max_tokens_requested": 500})
    assert body["max_output_tokens"] == 500
    for notes in ({}, {"max_tokens_requested": "500"}, {"max_tokens_requested": -5}):
        untouched = {**CHAT, "max_tokens": 50}
        OPENAI.as_requested(untouched, notes)
        assert untouched["max_tokens"] == 50
    without = dict(CHAT)
    OPENAI.as_requested(without, {"max_tokens_requested": 500})
    assert without == CHAT


def test_error_body_is_openai_shaped():
    body = json.loads(OPENAI.error_body("No.", "invalid_request_error", "nope"))
    assert body == {
        "error": {"message": "No.", "type": "invalid_request_error", "param": None, "code": "nope"}
    }


def test_keys_travel_as_bearer_and_every_caller_header_is_known():
    assert OPENAI.provider_auth("sk-x") == {"authorization": "Bearer sk-x"}
    assert OPENAI.credential_headers == ("authorization", "x-api-key", "api-key")
    assert OPENAI.caller_key(Headers(authorization="Bearer tg-a")) == "tg-a"
    with pytest.raises(ConflictingKeys):
        OPENAI.caller_key(Headers(authorization="Bearer tg-a", x_api_key="tg-b"))


@pytest.mark.parametrize(
    ("data", "payload", "ends"),
    [
        ("[DONE]", None, "before"),
        (" [DONE] ", None, "before"),
        ("{}", {"type": "response.completed"}, "after"),
        ("{}", {"type": "response.failed"}, "after"),
        ("{}", {"type": "response.incomplete"}, "after"),
        ("{}", {"type": "response.output_text.delta"}, None),
        ("{}", {"choices": []}, None),
    ],
)
def test_where_a_stream_ends(data, payload, ends):
    assert OPENAI.stream.ends(data, payload) == ends


def test_stream_usage_keeps_the_last_reported_figures():
    events = OPENAI.stream
    assert events.usage({"choices": []}, None) is None
    first = events.usage({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}, None)
    assert first == Usage(3, 4)
    assert events.usage({"choices": [{"delta": {"content": "x"}}]}, first) is first
    assert events.text({"choices": [{"delta": {"content": "x"}}]}) == "x"
    assert events.gate_only({"choices": [], "usage": {"prompt_tokens": 1}})
    assert not events.gate_only({"choices": [], "usage": None})


def count(text: str) -> int:
    return tokens.count_text(text, "gpt-4o")


def messages_of(*messages) -> dict:
    return {"model": "gpt-4o", "messages": list(messages)}


def test_the_dialect_estimates_with_its_exact_budget():
    body = messages_of({"role": "user", "content": "word " * 300})
    assert OPENAI.estimate_prompt("chat/completions", body, 10**6) == estimate_prompt(
        "chat/completions", body
    )
    assert OPENAI.estimate_prompt("chat/completions", body, 10) > estimate_prompt(
        "chat/completions", body
    )
    assert OPENAI.estimate_prompt("embeddings", {"input": "hi there"}, 10**6) == count("hi there")


def test_tool_calls_and_bare_messages_count():
    plain = messages_of({"role": "assistant", "content": "ok"})
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    called = messages_of({"role": "assistant", "content": "ok", "tool_calls": [call, "odd"]})
    added = estimate_prompt("chat/completions", called) - estimate_prompt("chat/completions", plain)
    assert added == count(json.dumps(call["function"]))
    custom = {"type": "custom", "custom": {"name": "grep", "input": "needle in the haystack"}}
    other = messages_of({"role": "assistant", "content": "ok", "tool_calls": [custom]})
    added = estimate_prompt("chat/completions", other) - estimate_prompt("chat/completions", plain)
    assert added == count(json.dumps(custom))  # a call of another kind counts whole
    bare = messages_of("just text", {"role": "user", "content": "hi"})
    expected = 3 + (3 + count("just text")) + (3 + count("hi") + count("user"))
    assert estimate_prompt("chat/completions", bare) == expected


@pytest.mark.parametrize("key", ["text", "content", "input", "output", "arguments", "refusal"])
def test_every_text_field_of_a_part_counts(key):
    part = {"type": "something", key: "the quick brown fox"}
    body = messages_of({"role": "user", "content": [part]})
    empty = messages_of({"role": "user", "content": []})
    added = estimate_prompt("chat/completions", body) - estimate_prompt("chat/completions", empty)
    assert added == count("the quick brown fox")


def test_images_count_a_fixed_amount_and_their_fields_no_text():
    image = {"type": "input_image", "text": "not counted", "image_url": "data:..."}
    nested = {"type": "message", "content": [image, {"type": "image_url"}]}
    assert estimate_prompt("responses", {"model": "gpt-4o", "input": nested}) == 2 * 85
    listed = messages_of({"role": "user", "content": [image]})
    assert estimate_prompt("chat/completions", listed) == 3 + 3 + count("user") + 85


def test_tools_functions_and_formats_all_count():
    base = messages_of({"role": "user", "content": "hi"})
    tools = [{"type": "function", "function": {"name": "get"}}]
    functions = [{"name": "legacy"}]
    text = {"format": {"type": "json_object"}}
    full = {**base, "tools": tools, "functions": functions, "text": text, "response_format": []}
    added = estimate_prompt("chat/completions", full) - estimate_prompt("chat/completions", base)

    def compact(value) -> str:
        return json.dumps(value, separators=(",", ":"))

    assert added == count(compact(tools)) + count(compact(functions)) + count(compact(text))


def test_responses_counts_instructions_and_input_items():
    items = [{"role": "user", "content": "hi"}]
    body = {"model": "gpt-4o", "instructions": "Be brief.", "input": items}
    without = {"model": "gpt-4o", "input": items}
    assert estimate_prompt("responses", body) == count("Be brief.") + estimate_prompt(
        "responses", without
    )
    assert estimate_prompt("responses", without) == 3 + 3 + count("hi") + count("user")


def test_terms_reserve_for_every_completion():
    terms = OPENAI.terms("chat/completions", {**CHAT, "n": 3}, 100)
    assert terms.completion_reserve == 300
    assert OPENAI.terms("embeddings", {"input": "x"}, 100).completion_reserve == 0
