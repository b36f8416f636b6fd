"""End to end: limits per model, a team's window shared by its keys, budgets in USD and strict,
on one real mitmdump in front of the real mock (prices from `prices:`, so cents are exact)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support.processes import Gateway, write_quotas
from tests.support.quotas import key_entries

SECRETS = {
    name: f"tg-{name}-secret"
    for name in ("ana", "team-a", "team-b", "cents", "strict", "sdk", "stream")
}
# USD per 1M tokens: a cheap and a dear model; the dear one's cached prompt tokens cost a tenth.
PRICES = """\
prices:
  cheap-model: {input: 100, output: 1000}
  dear-model: {input: 1000, cached_input: 100, output: 5000}
"""
PROXIES = f"""\
  models:
    context: /models
    provider: mock
    models: [gpt-4o*, o4-*]
    token_limits:
      total_tokens:
        - {{count: 100000, duration: 1m}}
        - {{count: 120, duration: 1m, models: [o4-*]}}
    keys:
{key_entries(ana=SECRETS["ana"])}\
  team:
    context: /team
    provider: mock
    budgets:
      - {{usd: 0.25, duration: 1d, scope: proxy}}
    keys:
{key_entries(a=SECRETS["team-a"], b=SECRETS["team-b"])}\
  cents:
    context: /cents
    provider: mock
    budgets:
      - {{usd: 1, duration: 1h}}
    keys:
{key_entries(c=SECRETS["cents"])}\
  strict:
    context: /strict
    provider: mock
    strict: true
    token_limits:
      total_tokens:
        - {{count: 300, duration: 1m}}
    keys:
{key_entries(s=SECRETS["strict"])}\
  sdk:
    context: /sdk
    provider: mock
    budgets:
      - {{usd: 0.01, duration: 1d}}
    keys:
{key_entries(k=SECRETS["sdk"])}\
  stream:
    context: /stream
    provider: mock
    token_limits:
      total_tokens:
        - {{count: 100000, duration: 1m}}
    keys:
{key_entries(t=SECRETS["stream"])}\
"""
HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def gateway(mock, tmp_path_factory):
    folder = tmp_path_factory.mktemp("budgets")
    config = write_quotas(folder / "quotas.yaml", mock.url, PROXIES)
    config.write_text(PRICES + config.read_text(encoding="utf-8"), encoding="utf-8")
    # The figures below are the tokenizer's: no cold margin for cheap-model, which tiktoken
    # does not know.
    margin = ("--set", "tokengate_estimate_margin=1")
    started = Gateway.start(config, f"reverse:{mock.url}", *margin)
    yield started
    started.stop()


def chat(gateway: Gateway, context: str, who: str, model: str, **extra) -> httpx.Response:
    headers = {"Authorization": f"Bearer {SECRETS[who]}", **extra.pop("headers", {})}
    body = {"model": model, "messages": HELLO, **extra}
    return httpx.post(
        f"{gateway.url}{context}/chat/completions", json=body, headers=headers, timeout=30
    )


def test_a_model_limit_refuses_its_model_while_another_model_of_the_key_is_admitted(gateway):
    first = chat(gateway, "/models", "ana", "o4-mini")
    assert first.status_code == 200, first.text
    refused = chat(gateway, "/models", "ana", "o4-mini")
    assert refused.status_code == 429
    assert refused.headers["X-RateLimit-Quota"] == "total_tokens-1m[o4-*]"
    assert "for models o4-*, per key" in refused.json()["error"]["message"]
    other = chat(gateway, "/models", "ana", "gpt-4o-mini")
    assert other.status_code == 200, other.text
    outside = chat(gateway, "/models", "ana", "o3")
    assert outside.status_code == 403
    assert "allows gpt-4o*, o4-*" in outside.json()["error"]["message"]


def test_a_team_budget_is_spent_by_two_keys(gateway):
    # Each call: 9 prompt tokens at $100/1M and 100 completion tokens at $1000/1M: $0.1009.
    for who in ("team-a", "team-b"):
        answer = chat(gateway, "/team", who, "cheap-model", max_tokens=100)
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-TokenGate-Cost"] == "0.100900"
    assert answer.headers["X-TokenGate-Budget-Remaining"] == "0.048200"
    # What is left holds the prompt ($0.0009) and 47 completion tokens: max_tokens is lowered.
    lowered = chat(gateway, "/team", "team-a", "cheap-model", max_tokens=100)
    assert lowered.status_code == 200 and lowered.headers["X-TokenGate-Max-Tokens"] == "47"
    assert lowered.headers["X-TokenGate-Budget-Remaining"] == "0.000300"
    spent = chat(gateway, "/team", "team-b", "cheap-model", max_tokens=100)
    assert spent.status_code == 429
    error = spent.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert "$0.000300 left, this request needs $0.000900" in error["message"]
    assert "shared by the proxy's keys" in error["message"]
    assert spent.headers["x-should-retry"] == "false"  # it refills in about a day


def test_a_budget_refuses_at_the_right_cent_after_mixed_models(gateway):
    dear = chat(gateway, "/cents", "cents", "dear-model", max_tokens=100)
    # 9 prompt tokens at $1000/1M, 100 completion tokens at $5000/1M: $0.509.
    assert dear.headers["X-TokenGate-Cost"] == "0.509000"
    # A cached prompt pays the cached rate; reasoning tokens are part of the completion, once.
    cached = chat(
        gateway,
        "/cents",
        "cents",
        "dear-model",
        max_tokens=10,
        headers={"X-Mock-Cached": "8", "X-Mock-Reasoning": "6"},
    )
    usage = cached.json()["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 8}
    assert cached.headers["X-TokenGate-Cost"] == "0.051800"  # 1 x 1000 + 8 x 100 + 10 x 5000
    cheap = chat(gateway, "/cents", "cents", "cheap-model", max_tokens=100)
    assert cheap.headers["X-TokenGate-Cost"] == "0.100900"
    # $1 - 0.509 - 0.0518 - 0.1009 = 0.3383: the dear model's next call is capped at 65 tokens
    # (9000 + 65 x 5000 = 334000 fits, 66 does not) and then leaves 0.0043.
    capped = chat(gateway, "/cents", "cents", "dear-model", max_tokens=100)
    assert capped.headers["X-TokenGate-Max-Tokens"] == "65"
    assert capped.headers["X-TokenGate-Budget-Remaining"] == "0.004300"
    refused = chat(gateway, "/cents", "cents", "dear-model", max_tokens=1)
    assert refused.status_code == 429
    assert "$0.004300 left, this request needs $0.009000" in refused.json()["error"]["message"]
    # The cheap model fits: its prompt ($0.0009) and 3 completion tokens.
    admitted = chat(gateway, "/cents", "cents", "cheap-model", max_tokens=4)
    assert admitted.status_code == 200 and admitted.headers["X-TokenGate-Cost"] == "0.003900"
    standing = httpx.get(
        f"{gateway.url}/cents/tokengate/usage",
        headers={"Authorization": f"Bearer {SECRETS['cents']}"},
        timeout=10,
    ).json()
    [budget] = standing["limits"]
    assert (budget["name"], budget["limit_usd"], budget["remaining_usd"]) == (
        "usd-1h",
        "1.000000",
        "0.000400",
    )
    assert (budget["used"], budget["reserved"]) == (999_600, 0)


def test_a_streamed_call_gives_its_cost_in_the_trailer(gateway):
    body = {"model": "cheap-model", "messages": HELLO, "max_tokens": 3, "stream": True}
    headers = {"Authorization": f"Bearer {SECRETS['stream']}"}
    with httpx.stream(
        "POST", f"{gateway.url}/stream/chat/completions", json=body, headers=headers, timeout=30
    ) as answer:
        text = answer.read().decode()
    assert answer.status_code == 200
    assert "x-tokens-consumed=12 x-tokengate-cost=0.003900\n" in text  # 9 x 100 + 3 x 1000


def test_strict_without_max_tokens_never_goes_over(gateway):
    answers = [chat(gateway, "/strict", "strict", "gpt-4o-mini") for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 429, 429]
    # The gate set the bound each time: 256 (the completion reserve), then what was left.
    assert [a.headers["X-TokenGate-Max-Tokens"] for a in answers[:2]] == ["256", "26"]
    spent = sum(a.json()["usage"]["total_tokens"] for a in answers[:2])
    assert spent == 300  # to the token, and never beyond


def test_the_sdk_raises_the_budget_message_and_does_not_retry_hours_away(gateway):
    sent = []
    client = openai.OpenAI(
        base_url=f"{gateway.url}/sdk",
        api_key=SECRETS["sdk"],
        max_retries=3,
        http_client=httpx.Client(event_hooks={"request": [sent.append]}),
    )
    first = client.chat.completions.with_raw_response.create(
        model="cheap-model", messages=HELLO, max_tokens=50
    )
    # $0.01 holds the prompt ($0.0009) and 9 completion tokens: $0.0099, $0.0001 left.
    assert first.headers["X-TokenGate-Max-Tokens"] == "9"
    assert first.headers["X-TokenGate-Budget-Remaining"] == "0.000100"
    sent.clear()
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="cheap-model", messages=HELLO, max_tokens=50)
    assert len(sent) == 1  # x-should-retry: false, the refill is a day away
    assert refused.value.code == "insufficient_quota"
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert "Budget reached for proxy 'sdk'" in refused.value.message
    assert "$0.000100 left" in refused.value.message
