"""Anthropic's Messages API through a real mitmdump in front of the mock speaking Anthropic, with
the official `anthropic` SDK: sync, async, `messages.stream`, tool use, count_tokens and the model
list; books exact against what the mock billed; the walkthrough 200 -> 429 -> 401; the SDK's
errors and waits; keys never upstream nor in saved flows; regular mode over HTTPS.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time

import anthropic
import httpx
import pytest
from tokengate_core.tools.capture import Capture

from tests.support.captures import ledger, replay
from tests.support.leaks import flow_fields, leaks
from tests.support.processes import PROVIDER_KEY, Gateway, Mock, self_signed, wait_until
from tests.support.quotas import ALICE, BOB, key_entries
from tests.support.redirect import to_the_mock

CAROL = "tg-carol-secret-key"
DAVE = "tg-dave-secret-key"
ERIN = "tg-erin-secret-key"  # fuzzed calls whose answers report usage: books exact
FRANK = "tg-frank-secret-key"  # fuzzed calls answered without believable usage: estimated
FUZZ_CASES = 30  # per key
CALLER_KEYS = (ALICE, BOB, CAROL, DAVE, ERIN, FRANK)
MODEL = "claude-sonnet-4-5"
HELLO = [{"role": "user", "content": "Hello!"}]
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def quotas_text(base_url: str, host: str) -> str:
    def proxy(name: str, count: int, duration: str, keys: str) -> str:
        return (
            f"  {name}:\n    context: /{name}\n    provider: claude\n"
            f"    token_limits:\n      total_tokens:\n        - {{count: {count}, "
            f"duration: {duration}}}\n    keys:\n{keys}"
        )

    return (
        "providers:\n  claude:\n    kind: anthropic\n"
        f"    base_url: {base_url}\n    api_key_env: TOKENGATE_TEST_PROVIDER_KEY\n"
        f"    hosts: [{host}]\nproxies:\n"
        + proxy("claude", 1_000_000, "1m", key_entries(alice=ALICE, bob=BOB))
        + proxy("tight", 100, "1m", key_entries(carol=CAROL))
        + proxy("burst", 60, "2s", key_entries(dave=DAVE))
        + proxy("fuzz", 100_000_000, "1d", key_entries(erin=ERIN, frank=FRANK))
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("anthropic")
    record = folder / "provider-received.jsonl"
    mock = Mock.start("--record", str(record))
    config = folder / "quotas.yaml"
    config.write_text(quotas_text(mock.url, "127.0.0.1"), encoding="utf-8")
    flows = folder / "saved.flows"
    gateway = Gateway.start(config, f"reverse:{mock.url}", "-w", str(flows))
    yield mock, gateway, record, flows
    gateway.stop()
    mock.process.stop()


def client(gateway: Gateway, key: str, proxy: str = "claude", **options) -> anthropic.Anthropic:
    options.setdefault("max_retries", 0)
    return anthropic.Anthropic(base_url=f"{gateway.url}/{proxy}", api_key=key, **options)


def standing(gateway: Gateway, proxy: str, key: str) -> dict:
    answer = httpx.get(f"{gateway.url}/{proxy}/tokengate/usage", headers={"x-api-key": key})
    (window,) = answer.json()["limits"]
    return window


def test_sdk_sync_async_stream_and_tools_keep_exact_books(served):
    mock, gateway, _, _ = served
    tag = {"X-Mock-Tag": "alice"}
    sync = client(gateway, ALICE, default_headers=tag)
    system = [{"type": "text", "text": "Be brief. " * 20, "cache_control": {"type": "ephemeral"}}]

    first = sync.messages.create(model=MODEL, max_tokens=30, system=system, messages=HELLO)
    assert first.content[0].text.startswith("Lorem ipsum")
    assert first.stop_reason == "end_turn" or first.usage.output_tokens == 30
    assert first.usage.cache_creation_input_tokens > 0
    again = sync.messages.with_raw_response.create(
        model=MODEL, max_tokens=30, system=system, messages=HELLO
    )
    cached = again.parse().usage
    assert cached.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    prompt = cached.input_tokens + cached.cache_read_input_tokens
    assert again.headers["x-tokens-consumed"] == str(prompt + cached.output_tokens)
    assert int(again.headers["anthropic-ratelimit-tokens-remaining"]) < 1_000_000
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", again.headers["anthropic-ratelimit-tokens-reset"]
    )

    async def in_parallel():
        async with anthropic.AsyncAnthropic(
            base_url=f"{gateway.url}/claude", api_key=ALICE, max_retries=0, default_headers=tag
        ) as async_client:
            return await asyncio.gather(
                *(
                    async_client.messages.create(model=MODEL, max_tokens=12, messages=HELLO)
                    for _ in range(3)
                )
            )

    assert all(m.usage.output_tokens == 12 for m in asyncio.run(in_parallel()))

    with sync.messages.stream(model=MODEL, max_tokens=40, messages=HELLO) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == final.content[0].text and final.usage.output_tokens == 40
    assert final.usage.input_tokens > 0

    tools = sync.messages.create(
        model=MODEL,
        max_tokens=20,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert tools.content[0].type == "tool_use" and tools.content[0].name == "get_weather"
    with sync.messages.stream(
        model=MODEL,
        max_tokens=20,
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [block.model_dump() for block in tools.content]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": tools.content[0].id, "content": "Sun"}
                ],
            },
        ],
        tools=[WEATHER],
        tool_choice={"type": "any"},
    ) as stream:
        called = stream.get_final_message()
    assert called.content[0].type == "tool_use" and "text" in called.content[0].input

    counted = sync.messages.count_tokens(model=MODEL, messages=HELLO)  # unmetered
    assert counted.input_tokens > 0
    assert next(m.id for m in sync.models.list()) == "claude-sonnet-4-5"

    window = standing(gateway, "claude", ALICE)
    assert window["reserved"] == 0
    assert window["used"] == mock.stats()["delivered_by_tag"]["alice"]


def test_caller_key_forms_and_the_provider_key_upstream(served):
    mock, gateway, _, _ = served
    url = f"{gateway.url}/claude/v1/messages"
    body = {"model": MODEL, "max_tokens": 5, "messages": HELLO}
    version = {"anthropic-version": "2023-06-01", "anthropic-beta": "prompt-caching-2024-07-31"}
    answer = httpx.post(url, json=body, headers={"x-api-key": BOB, **version})
    assert answer.status_code == 200
    upstream = mock.last_request_headers()
    assert upstream["x-api-key"] == PROVIDER_KEY and "authorization" not in upstream
    assert upstream["anthropic-beta"] == "prompt-caching-2024-07-31"
    both = httpx.post(
        url, json=body, headers={"x-api-key": BOB, "authorization": f"Bearer {ALICE}"}
    )
    assert both.status_code == 401
    assert both.json()["error"]["type"] == "authentication_error"
    assert "Different API keys" in both.json()["error"]["message"]
    missing = httpx.post(url, json={"model": MODEL, "messages": HELLO}, headers={"x-api-key": BOB})
    assert missing.status_code == 400
    assert missing.json() == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "max_tokens: a whole number of at least 1 is required",
        },
    }
    assert missing.headers["X-TokenGate-Source"] == "gateway"
    with pytest.raises(anthropic.PermissionDeniedError, match="not available through this gateway"):
        client(gateway, BOB).beta.files.list()


def test_walkthrough_200_429_401_with_the_sdk(served):
    _, gateway, _, _ = served
    carol = client(gateway, CAROL, "tight")
    ok = carol.messages.with_raw_response.create(model=MODEL, max_tokens=80, messages=HELLO)
    assert ok.http_response.status_code == 200
    assert ok.headers["anthropic-ratelimit-tokens-limit"] == "100"
    with pytest.raises(anthropic.RateLimitError) as refused:
        carol.messages.create(model=MODEL, max_tokens=60, messages=HELLO)
    error = refused.value
    assert error.body["error"]["type"] == "rate_limit_error"
    assert error.message.startswith("Error code: 429")
    assert "Rate limit reached for proxy 'tight'" in error.body["error"]["message"]
    assert 50 <= int(error.response.headers["retry-after"]) <= 60
    headers = error.response.headers
    assert (
        headers["anthropic-ratelimit-tokens-remaining"] == headers["x-ratelimit-remaining-tokens"]
    )
    with pytest.raises(anthropic.AuthenticationError, match="Incorrect API key"):
        client(gateway, "tg-wrong").messages.create(model=MODEL, max_tokens=5, messages=HELLO)


def test_the_sdk_waits_as_retry_after_says_then_succeeds(served):
    mock, gateway, _, _ = served
    dave = client(gateway, DAVE, "burst", max_retries=1, default_headers={"X-Mock-Tag": "dave"})
    first = dave.messages.create(model=MODEL, max_tokens=40, messages=HELLO)  # spends the window
    started = time.monotonic()
    answer = dave.messages.with_raw_response.create(model=MODEL, max_tokens=40, messages=HELLO)
    waited = time.monotonic() - started
    assert answer.http_response.status_code == 200 and answer.retries_taken == 1
    assert 0.5 < waited < 5
    # Each call delivered its prompt and what max_tokens allowed (the gate may lower it to fit).
    served = [first.usage, answer.parse().usage]
    delivered = sum(usage.input_tokens + usage.output_tokens for usage in served)
    assert mock.stats()["delivered_by_tag"]["dave"] == delivered


def test_keys_never_upstream_nor_in_saved_flows(served):
    _, gateway, record, flows = served
    c = client(gateway, ALICE, default_headers={"X-Mock-Mode": "echo-key"})
    with pytest.raises(anthropic.AuthenticationError) as echoed:
        c.messages.create(model=MODEL, max_tokens=5, messages=HELLO)
    assert PROVIDER_KEY not in echoed.value.message
    with c.messages.stream(model=MODEL, max_tokens=5, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
    assert text.startswith("You sent ") and PROVIDER_KEY not in text
    assert wait_until(lambda: flows.exists() and flows.stat().st_size > 0)
    provider_side = record.read_bytes()
    assert PROVIDER_KEY.encode() in provider_side  # what is searched holds the provider's key
    assert leaks(provider_side, CALLER_KEYS) == []
    saved = flows.read_bytes() + flow_fields(flows)
    assert b"/claude/v1/messages" in saved
    assert leaks(saved, (PROVIDER_KEY, *CALLER_KEYS)) == []


def test_regular_mode_with_api_anthropic_com_in_hosts(tmp_path, monkeypatch):
    mock = Mock.start("--tls-cert", str(self_signed(tmp_path)))
    config = tmp_path / "quotas.yaml"
    config.write_text(quotas_text("https://api.anthropic.com", "api.anthropic.com"), "utf-8")
    redirect = to_the_mock(tmp_path, "api.anthropic.com", mock.url)
    confdir = tmp_path / "confdir"
    gateway = Gateway.start(
        config, "regular", "-s", str(redirect),
        "--set", f"confdir={confdir}", "--set", "ssl_insecure=true",  # the mock's own cert
    )  # fmt: skip
    try:
        for variable in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "ANTHROPIC_BASE_URL"):
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.setenv("HTTPS_PROXY", gateway.url)
        monkeypatch.setenv("SSL_CERT_FILE", str(confdir / "mitmproxy-ca-cert.pem"))
        carol = anthropic.Anthropic(api_key=CAROL, max_retries=0)  # Anthropic's own URL
        assert str(carol.base_url).startswith("https://api.anthropic.com")
        with carol.messages.stream(model=MODEL, max_tokens=80, messages=HELLO) as stream:
            assert stream.get_final_message().usage.output_tokens == 80
        with pytest.raises(anthropic.RateLimitError):
            carol.messages.create(model=MODEL, max_tokens=50, messages=HELLO)
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(api_key="tg-wrong", max_retries=0).models.list()
        stats = mock.stats()
        assert stats["requests"] == 1 and stats["authorized"] == 1
        assert stats["last_request"]["headers"]["x-api-key"] == PROVIDER_KEY
        assert stats["last_request"]["headers"]["Host"] == "api.anthropic.com"
    finally:
        gateway.stop()
        mock.process.stop()


# Mock modes whose answers report usage (or are cut before any usage: nothing delivered), and
# modes where the gate must estimate (its estimate is above what the mock bills).
REPORTING_MODES = ["normal", "split", "drip", "cut", "reset-mid", "error:529", "error:429"]
ESTIMATED_MODES = ["no-usage", "usage-negative", "usage-absurd", "usage-float", "usage-string"]


def fuzzed_body(rng: random.Random) -> bytes:
    """A Messages body with random blocks, sometimes odd or broken."""
    texts = ["Hello!", "é中 " * rng.randint(1, 30), "", "\ud800", "x" * rng.randint(0, 3000)]
    block = rng.choice(
        [
            {"type": "text", "text": rng.choice(texts)},
            {"type": "tool_use", "id": "t", "name": "f", "input": {"a": rng.choice(texts)}},
            {"type": "tool_result", "tool_use_id": "t", "content": rng.choice(texts)},
            {"type": "document", "source": {"type": "text", "data": rng.choice(texts)}},
            {"type": "image", "source": {"type": "base64", "data": "iVBORw0KGgo="}},
            {"type": rng.choice(["?", 3, None])},
        ]
    )
    body = {
        "model": rng.choice([MODEL, "claude-x", 7]),
        "max_tokens": rng.choice([1, 16, 64, 200, 0, -1, "9", None]),
        "messages": [{"role": "user", "content": rng.choice([[block], rng.choice(texts)])}],
        "stream": rng.choice([True, False, "yes"]),
    }
    if rng.random() < 0.3:
        body["system"] = rng.choice([rng.choice(texts), [block], 5])
    if rng.random() < 0.2:
        body["tools"] = [WEATHER]
        body["tool_choice"] = rng.choice([{"type": "any"}, {"type": "tool", "name": "x"}, "?"])
    raw = json.dumps(body).encode()
    return raw[: rng.randint(0, len(raw))] if rng.random() < 0.1 else raw


def test_fuzzed_bodies_and_streams_leave_no_error_nor_reservation(served):
    mock, gateway, _, _ = served
    rng = random.Random(20261203)
    statuses = []
    for key, tag, modes in ((ERIN, "erin", REPORTING_MODES), (FRANK, "frank", ESTIMATED_MODES)):
        for seed in range(FUZZ_CASES):
            headers = {
                "x-api-key": key,
                "X-Mock-Mode": rng.choice(modes),
                "X-Mock-Seed": str(seed),
                "X-Mock-Tag": tag,
                "content-type": "application/json",
            }
            request = ("POST", f"{gateway.url}/fuzz/v1/messages")
            try:
                with httpx.stream(*request, content=fuzzed_body(rng), headers=headers) as answer:
                    statuses.append(answer.status_code)
                    for _ in answer.iter_raw():
                        pass
            except httpx.HTTPError:
                statuses.append(None)  # the provider cut the answer: the caller's is cut too
    assert {200, 400} <= set(statuses)
    delivered = mock.stats()["delivered_by_tag"]
    for key in (ERIN, FRANK):
        assert wait_until(lambda key=key: standing(gateway, "fuzz", key)["reserved"] == 0)
    assert standing(gateway, "fuzz", ERIN)["used"] == delivered["erin"]
    assert standing(gateway, "fuzz", FRANK)["used"] >= delivered["frank"] > 0
    for bad in ("Traceback", "Addon error", "error in "):
        assert bad not in gateway.process.output, gateway.process.output[-3000:]


def test_qa_replay_of_anthropic_flows_gives_the_live_ledger(tmp_path):
    mock = Mock.start()
    config = tmp_path / "quotas.yaml"
    config.write_text(quotas_text(mock.url, "127.0.0.1"), encoding="utf-8")
    flows, live = tmp_path / "capture.flows", tmp_path / "live.jsonl"
    gateway = Gateway.start(
        config, f"reverse:{mock.url}", "-w", str(flows),
        "--set", f"tokengate_ledger={live}", "--set", "store_streamed_bodies=true",
    )  # fmt: skip
    try:
        alice, carol = client(gateway, ALICE), client(gateway, CAROL, "tight")
        alice.messages.create(model=MODEL, max_tokens=30, messages=HELLO)
        with alice.messages.stream(model=MODEL, max_tokens=25, messages=HELLO) as stream:
            stream.until_done()
        alice.messages.count_tokens(model=MODEL, messages=HELLO)
        carol.messages.create(model=MODEL, max_tokens=80, messages=HELLO)
        with pytest.raises(anthropic.RateLimitError):
            carol.messages.create(model=MODEL, max_tokens=80, messages=HELLO)
        with pytest.raises(anthropic.AuthenticationError):
            client(gateway, "tg-wrong").messages.create(model=MODEL, max_tokens=5, messages=HELLO)
    finally:
        gateway.stop()
        mock.process.stop()
    replayed = tmp_path / "replayed.jsonl"
    replay(Capture(tmp_path, [], PROVIDER_KEY, {}), replayed)  # its flows and quotas.yaml
    lines = ledger(replayed)
    assert all(line.pop("replay") is True for line in lines)
    assert lines == ledger(live) and len(lines) == 6
    assert [line["status"] for line in lines] == [200, 200, 200, 200, 429, 401]
