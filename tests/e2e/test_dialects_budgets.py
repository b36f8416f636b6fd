"""Budgets, limits per model, metrics and QA replay on the Anthropic and Azure dialects together
(OpenAI's beside them): one real mitmdump in front of the real mock, driven with the `anthropic`
SDK, `AzureOpenAI` and `OpenAI`, prices from the bundled genai-prices table (so the figures are
Anthropic's and OpenAI's own).

The tests run in file order on one gateway: the calls first, then the metrics page against the
mock's stats and the ledger, then the capture's replay against the live ledger.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tokengate_core.estimates import DEFAULT_WARMUP, key_of
from tokengate_core.tools.mock import LOREM

from tests.support.captures import ledger
from tests.support.processes import MITMDUMP, ROOT, Gateway, Mock, wait_until
from tests.support.quotas import ALICE, BOB, key_entries

CAROL = "tg-carol-secret-key"
DAVE = "tg-dave-secret-key"
ERIN = "tg-erin-secret-key"
SONNET, OPUS = "claude-sonnet-4-5", "claude-opus-4-1"
# USD per 1M tokens, as Anthropic and OpenAI list them (and genai-prices with them).
SONNET_RATES = {"input": 3.0, "cache_write": 3.75, "cache_read": 0.30, "output": 15.0}
GPT_4O = {"input": 2.5, "output": 10.0}
API_VERSION = "2024-10-21"
HELLO = [{"role": "user", "content": "Hello!"}]


def quotas_text(mock_url: str) -> str:
    def proxy(name: str, provider: str, limits: str, keys: str, strict: bool = False) -> str:
        return (
            f"  {name}:\n    context: /{name}\n    provider: {provider}\n"
            + ("    strict: true\n" if strict else "")
            + limits
            + "    keys:\n"
            + keys
        )

    def tokens_for(models: str) -> str:
        return (
            "    token_limits:\n      total_tokens:\n"
            f"        - {{count: 100000, duration: 1m, models: [{models}]}}\n"
        )

    budget = "    budgets:\n      - {{usd: {usd}, duration: 1d}}\n"
    return (
        "providers:\n"
        f"  claude:\n    kind: anthropic\n    base_url: {mock_url}\n    hosts: [claude.test]\n"
        "    api_key_env: TOKENGATE_TEST_PROVIDER_KEY\n"
        f"  azure:\n    kind: azure\n    base_url: {mock_url}\n    hosts: [azure.test]\n"
        "    api_key_env: TOKENGATE_TEST_PROVIDER_KEY\n    deployments: {gpt4o-prod: gpt-4o}\n"
        f"  openai:\n    base_url: {mock_url}/v1\n    api_key_env: TOKENGATE_TEST_PROVIDER_KEY\n"
        "proxies:\n"
        + proxy(
            "cl",
            "claude",
            tokens_for("claude-sonnet*") + budget.format(usd=0.05),
            key_entries(alice=ALICE),
            strict=True,
        )
        + proxy("spent", "claude", budget.format(usd=0.002), key_entries(bob=BOB))
        + proxy("az", "azure", tokens_for("gpt-4o") + budget.format(usd=0.05), key_entries(c=CAROL))
        + proxy("free", "azure", tokens_for("'*'"), key_entries(dave=DAVE))
        + proxy("oa", "openai", budget.format(usd=0.05), key_entries(erin=ERIN))
    )


@dataclass
class Run:
    mock: Mock
    gateway: Gateway
    folder: Path
    metrics_url: str

    def claude(self, proxy: str = "cl", key: str = ALICE, **options) -> anthropic.Anthropic:
        options.setdefault("max_retries", 0)
        return anthropic.Anthropic(base_url=f"{self.gateway.url}/{proxy}", api_key=key, **options)

    def ledger(self, at_least: int) -> list[dict]:
        """The live ledger once it holds `at_least` lines (a thread writes it)."""
        path = self.folder / "ledger.jsonl"
        assert wait_until(lambda: path.exists() and len(ledger(path)) >= at_least)
        return ledger(path)

    def azure(self, proxy: str = "az", key: str = CAROL, **options) -> openai.AzureOpenAI:
        return openai.AzureOpenAI(
            azure_endpoint=f"{self.gateway.url}/{proxy}",
            api_key=key,
            api_version=API_VERSION,
            max_retries=0,
            **options,
        )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dialects-budgets")
    mock = Mock.start("--deployment", "other-dep=gpt-4o-mini-2024-07-18")
    quotas = folder / "quotas.yaml"
    quotas.write_text(quotas_text(mock.url), encoding="utf-8")
    gateway = Gateway.start(
        quotas,
        f"reverse:{mock.url}",
        "--set", "tokengate_metrics=127.0.0.1:0",
        "--set", f"tokengate_ledger={folder / 'ledger.jsonl'}",
        "--set", "store_streamed_bodies=true",
        "-w", str(folder / "capture.flows"),
    )  # fmt: skip
    try:
        assert wait_until(lambda: "metrics at" in gateway.process.output)
        url = re.search(r"metrics at (\S+)", gateway.process.output).group(1)
        yield Run(mock, gateway, folder, url)
    finally:
        gateway.stop()
        mock.process.stop()


def usd(rates: dict[str, float], **tokens: int) -> float:
    return sum(rates[part] * count for part, count in tokens.items()) / 1_000_000


def test_anthropic_calls_are_priced_with_the_cache_rates_and_the_budget_told(run):
    client = run.claude()
    system = [{"type": "text", "text": "Be brief. " * 400, "cache_control": {"type": "ephemeral"}}]
    for _ in range(2):  # the first writes the prompt cache, the second reads it
        raw = client.messages.with_raw_response.create(
            model=SONNET, max_tokens=30, system=system, messages=HELLO
        )
        usage = raw.parse().usage
        expected = usd(
            SONNET_RATES,
            input=usage.input_tokens,
            cache_write=usage.cache_creation_input_tokens,
            cache_read=usage.cache_read_input_tokens,
            output=usage.output_tokens,
        )
        assert float(raw.headers["x-tokengate-cost"]) == pytest.approx(expected, abs=1e-6)
        assert float(raw.headers["x-tokengate-budget-remaining"]) < 0.05
        # Anthropic's own headers describe the token limit, never the budget's micro-dollars.
        assert raw.headers["anthropic-ratelimit-tokens-limit"] == "100000"
    assert usage.cache_read_input_tokens > 0

    with client.messages.stream(model=SONNET, max_tokens=20, messages=HELLO) as stream:
        final = stream.get_final_message()
    line = next(entry for entry in run.ledger(3) if entry["stream"])
    expected = usd(SONNET_RATES, input=final.usage.input_tokens, output=final.usage.output_tokens)
    assert line["cost_usd"] == pytest.approx(expected, abs=1e-6)


def test_the_stream_trailer_carries_the_cost_and_strict_bounds_max_tokens(run):
    headers = {"x-api-key": ALICE, "anthropic-version": "2023-06-01"}
    body = {"model": SONNET, "max_tokens": 10, "stream": True, "messages": HELLO}
    with httpx.stream("POST", f"{run.gateway.url}/cl/v1/messages", headers=headers, json=body) as s:
        comments = [line for line in s.iter_lines() if line.startswith(":")]
    assert re.search(r"x-tokengate-cost=0\.\d{6} x-tokengate-budget-remaining=0\.", comments[0])

    # More than the budget can pay for: lowered to what it can.
    answer = httpx.post(
        f"{run.gateway.url}/cl/v1/messages",
        headers=headers,
        json={"model": SONNET, "max_tokens": 100_000, "messages": HELLO},
    )
    assert answer.status_code == 200
    lowered = int(answer.headers["x-tokengate-max-tokens"])
    assert 0 < lowered * SONNET_RATES["output"] / 1e6 < 0.05
    # Anthropic requires max_tokens: without it the gate answers as Anthropic would.
    asked = run.mock.stats()["requests"]
    missing = httpx.post(
        f"{run.gateway.url}/cl/v1/messages",
        headers=headers,
        json={"model": SONNET, "messages": HELLO},
    )
    assert missing.status_code == 400
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert run.mock.stats()["requests"] == asked


def test_a_spent_budget_is_an_anthropic_rate_limit_error_the_sdk_does_not_retry(run):
    client = run.claude("spent", BOB, max_retries=2)
    with pytest.raises(anthropic.RateLimitError) as refused:
        for _ in range(5):  # $0.002: two opus calls of 10 tokens, then refused
            client.messages.create(model=OPUS, max_tokens=10, messages=HELLO)
    asked = run.mock.stats()["requests"]
    error = refused.value
    assert error.body["error"]["type"] == "rate_limit_error"
    assert error.body["error"]["message"].startswith("Budget reached for proxy 'spent'")
    assert error.response.headers["x-ratelimit-quota"] == "usd-1d"
    assert error.response.headers["x-should-retry"] == "false"
    assert "x-ratelimit-limit" not in error.response.headers  # a budget is not a token limit
    assert run.mock.stats()["requests"] == asked  # refused by the gate, not retried


def test_azure_prices_and_limits_the_mapped_model_and_refuses_an_unpriced_deployment(run):
    client = run.azure()
    raw = client.chat.completions.with_raw_response.create(
        model="gpt4o-prod", messages=HELLO, max_tokens=5
    )
    usage = raw.parse().usage
    expected = usd(GPT_4O, input=usage.prompt_tokens, output=usage.completion_tokens)
    assert float(raw.headers["x-tokengate-cost"]) == pytest.approx(expected, abs=1e-6)
    assert raw.headers["x-ratelimit-limit-tokens"] == "100000"  # the limit for gpt-4o applies

    asked = run.mock.stats()["requests"]
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="other-dep", messages=HELLO, max_tokens=5)
    message = refused.value.body["message"]
    assert "'other-dep'" in message and "deployments:" in message and "prices:" in message
    assert run.mock.stats()["requests"] == asked
    lines = [line for line in run.ledger(11) if line["proxy"] == "az"]
    assert [(line["model"], line["status"]) for line in lines] == [
        ("gpt-4o", 200),
        ("other-dep", 403),
    ]


def test_the_usd_reservation_follows_the_learned_correction_of_the_mapped_model(run):
    """The mock counts prompts twice what the gate's tokenizer does: once learned (under the
    model `deployments` maps), the prompt is reserved, in tokens and in dollars, at the
    provider's count; an unnamed deployment learns under its own name, the one admission asks."""
    doubled = run.azure(default_headers={"X-Mock-Prompt-Rule": "scale:2"})
    long_enough = [{"role": "user", "content": LOREM[:400]}]  # a prompt that teaches
    for _ in range(DEFAULT_WARMUP):
        settled = doubled.chat.completions.with_raw_response.create(
            model="gpt4o-prod", messages=long_enough, max_tokens=5
        )
    before = float(settled.headers["x-tokengate-budget-remaining"])
    with doubled.chat.completions.with_streaming_response.create(
        model="gpt4o-prod",
        messages=long_enough,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    ) as streamed:
        # A stream's headers leave before its usage is known: the budget less the reservation.
        held = before - float(streamed.headers["x-tokengate-budget-remaining"])
        chunks = list(streamed.parse())
    reported = next(chunk.usage for chunk in reversed(chunks) if chunk.usage).prompt_tokens
    line = run.ledger(12 + DEFAULT_WARMUP)[-1]
    prompt = line["reserved"] - 5
    assert prompt >= reported  # corrected to the provider's count, not the tokenizer's half
    assert held == pytest.approx(usd(GPT_4O, input=prompt, output=5), abs=1.5e-6)

    free = run.azure("free", DAVE)
    free.chat.completions.create(model="other-dep", messages=long_enough, max_tokens=5)
    assert run.ledger(13 + DEFAULT_WARMUP)[-1]["model"] == "gpt-4o-mini-2024-07-18"


def test_openai_calls_beside_them_are_priced_json_and_streamed(run):
    with openai.OpenAI(base_url=f"{run.gateway.url}/oa", api_key=ERIN, max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=HELLO, max_tokens=5
        )
        usage = raw.parse().usage
        expected = usd(GPT_4O, input=usage.prompt_tokens, output=usage.completion_tokens)
        assert float(raw.headers["x-tokengate-cost"]) == pytest.approx(expected, abs=1e-6)
        chunks = client.chat.completions.create(
            model="gpt-4o", messages=HELLO, max_tokens=5, stream=True
        )
        assert list(chunks)
    assert "cost_usd" in run.ledger(15 + DEFAULT_WARMUP)[-1]


def test_metrics_match_the_mock_and_the_ledger(run):
    page = httpx.get(run.metrics_url, timeout=10).text
    samples = [s for f in text_string_to_metric_families(page) for s in f.samples]

    def total(name: str, **labels: str) -> float:
        return sum(
            s.value for s in samples if s.name == name and labels.items() <= s.labels.items()
        )

    served = run.mock.stats()["tokens_served"]
    assert total("tokengate_tokens_total", dimension="prompt") == served["prompt"]
    assert total("tokengate_tokens_total", dimension="completion") == served["completion"]
    lines = run.ledger(15 + DEFAULT_WARMUP)
    spent = sum(line.get("cost_usd", 0) for line in lines)
    assert total("tokengate_spend_usd_total") == pytest.approx(spent, abs=1e-6)
    assert total("tokengate_spend_usd_total", proxy="az") == pytest.approx(
        sum(line.get("cost_usd", 0) for line in lines if line["proxy"] == "az"), abs=1e-6
    )
    assert total("tokengate_requests_total", proxy="spent", limit="usd-1d") == 1
    # OpenTelemetry's histogram covers Anthropic's Messages API and Azure, by their GenAI names.
    for provider, proxies in (("anthropic", ("cl", "spent")), ("azure.ai.openai", ("az", "free"))):
        prompt = sum(total("tokengate_tokens_total", proxy=p, dimension="prompt") for p in proxies)
        assert prompt > 0
        assert (
            total(
                "gen_ai_client_token_usage_sum",
                gen_ai_provider_name=provider,
                gen_ai_operation_name="chat",
                gen_ai_token_type="input",
            )
            == prompt
        )


def test_replay_gives_the_live_ledger_and_learning_went_by_the_admitted_model(run):
    run.gateway.stop()  # the capture is complete, the learned records stored
    with sqlite3.connect(run.folder / ".state" / "tokengate.sqlite3") as db:
        learned = {key for (key,) in db.execute("SELECT key FROM learned")}
    # Under the model admission asks for: the mapped one, or an unnamed deployment's own name.
    assert learned >= {key_of("azure", "gpt-4o"), key_of("azure", "other-dep")}
    assert key_of("azure", "gpt-4o-mini-2024-07-18") not in learned
    live = ledger(run.folder / "ledger.jsonl")
    assert sum("cost_usd" in line for line in live) >= 6
    replayed_path = run.folder / "replay.jsonl"
    argv = [str(MITMDUMP), "-nr", str(run.folder / "capture.flows"), "-s", "addons/tokengate.py"]
    argv += ["--set", f"tokengate_config={run.folder / 'quotas.yaml'}"]
    argv += ["--set", f"tokengate_ledger={replayed_path}"]
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, timeout=60)
    replayed = ledger(replayed_path)
    assert all(line.pop("replay") is True for line in replayed)
    assert replayed == live
