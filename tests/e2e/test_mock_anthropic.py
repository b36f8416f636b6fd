"""The bundled mock speaking Anthropic, called with the official `anthropic` SDK directly: its
answers, its prompt-count rule and cache, its errors (its own 429 with Anthropic's headers)."""

from __future__ import annotations

import math
import uuid

import anthropic
import httpx
import pytest
from tokengate_core import tokens

from tests.support.processes import PROVIDER_KEY

MODEL = "claude-haiku-4-5"


@pytest.fixture
def sdk(fresh_mock):
    return anthropic.Anthropic(base_url=fresh_mock.url, api_key=PROVIDER_KEY, max_retries=0)


def test_its_own_prompt_rule_cache_and_max_tokens(sdk, fresh_mock):
    text = f"Mock rule {uuid.uuid4().int % 10**6}. " * 30  # a prefix no earlier run cached
    system = [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]
    cl100k = len(tokens.get_encoding("cl100k_base").encode(text))
    hello = [{"role": "user", "content": "Hello!"}]
    first = sdk.messages.create(model=MODEL, max_tokens=7, system=system, messages=hello)
    cached = math.ceil(cl100k * 1.25)
    assert first.usage.cache_creation_input_tokens == cached
    assert first.usage.input_tokens == 7 + 4 + math.ceil((cl100k + 2) * 1.25) - cached
    assert (first.usage.output_tokens, first.stop_reason) == (7, "max_tokens")
    later = [*hello, {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Go on"}]
    second = sdk.messages.create(model=MODEL, max_tokens=500, system=system, messages=later)
    assert second.usage.cache_read_input_tokens == cached
    assert second.usage.cache_creation_input_tokens == 0
    assert (second.usage.output_tokens, second.stop_reason) == (120, "end_turn")
    counted = sdk.messages.count_tokens(model=MODEL, system=system, messages=hello)
    assert counted.input_tokens == first.usage.input_tokens + cached
    assert second.usage.input_tokens > first.usage.input_tokens  # the later turns, uncached
    assert fresh_mock.stats()["tokens_served"]["completion"] == 127


def test_its_errors_are_anthropics(sdk, fresh_mock):
    hello = [{"role": "user", "content": "Hello!"}]
    mode = {"X-Mock-Mode": "error:429"}
    with pytest.raises(anthropic.RateLimitError) as limited:
        sdk.messages.create(model=MODEL, max_tokens=5, messages=hello, extra_headers=mode)
    assert limited.value.body["error"]["type"] == "rate_limit_error"
    assert limited.value.response.headers["anthropic-ratelimit-tokens-remaining"] == "0"
    assert limited.value.response.headers["retry-after"] == "7"
    with pytest.raises(anthropic.InternalServerError) as overloaded:
        sdk.messages.create(
            model=MODEL, max_tokens=5, messages=hello, extra_headers={"X-Mock-Mode": "error:529"}
        )
    assert overloaded.value.body["error"]["type"] == "overloaded_error"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=fresh_mock.url, api_key="wrong").models.list()
    missing = httpx.post(
        f"{fresh_mock.url}/v1/messages",
        json={"messages": hello},
        headers={"x-api-key": PROVIDER_KEY},
    )
    assert (missing.status_code, missing.json()["error"]["message"]) == (
        400,
        "max_tokens: Field required",
    )
    assert [model.id for model in sdk.models.list()][:1] == ["claude-sonnet-4-5"]
