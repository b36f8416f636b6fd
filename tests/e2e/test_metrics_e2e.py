"""End to end: a real mitmdump serving its metrics, driven with the openai SDK and raw HTTP
against the real mock, its page parsed with prometheus-client's parser and checked against what
the mock served; the shipped dashboard and alert rules checked against that same page."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import PROVIDER_KEY, ROOT, Gateway, wait_until, write_quotas
from tests.support.quotas import ALICE, BOB, proxy_yaml

CONTEXT = "/rate-limited-proxy"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}
# Our metrics' names; label names may share the prefix (gen_ai_request_model).
NAMES = re.compile(r"\b(?:tokengate|gen_ai)_[a-z_]+\b")


@dataclass
class Scraped:
    page: str
    log: str  # mitmdump's output, once it was stopped
    families: list  # prometheus_client Metric objects, as parsed
    served: dict  # the mock's stats once the traffic was done

    def value(self, name: str, **labels: str) -> float:
        return sum(
            sample.value
            for family in self.families
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def names(self) -> set[str]:
        """Every sample name the page can hold, from each family's type (a family whose
        labelled series saw nothing yet still declares itself)."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        return {
            family.name + suffix
            for family in self.families
            for suffix in suffixes.get(family.type, ("",))
        }

    def label_names(self) -> set[str]:
        return {name for f in self.families for s in f.samples for name in s.labels}


@pytest.fixture(scope="module")
def scraped(mock, tmp_path_factory) -> Scraped:
    mock.reset()
    folder = tmp_path_factory.mktemp("metrics")
    quotas = write_quotas(folder / "quotas.yaml", mock.url, proxy_yaml(count=1000))
    gateway = Gateway.start(quotas, f"reverse:{mock.url}", "--set", "tokengate_metrics=127.0.0.1:0")
    try:
        assert wait_until(lambda: "metrics at" in gateway.process.output)
        url = re.search(r"metrics at (\S+)", gateway.process.output).group(1)
        drive(gateway)
        page = httpx.get(url, timeout=10).text
    finally:
        gateway.stop()
    families = list(text_string_to_metric_families(page))
    return Scraped(page, gateway.process.output, families, mock.stats())


def drive(gateway: Gateway) -> None:
    """Two SDK calls and a stream for alice, a provider error, a caller without a key, and
    bob spending his minute then refused."""
    base = gateway.url + CONTEXT
    with openai.OpenAI(base_url=base, api_key=ALICE, max_retries=0) as alice:
        alice.chat.completions.create(**CHAT, max_tokens=20)
        alice.chat.completions.create(**CHAT, max_tokens=7)
        assert len(list(alice.chat.completions.create(**CHAT, max_tokens=15, stream=True))) > 2
    with httpx.Client(base_url=base, timeout=10) as raw:
        failed = raw.post(
            "/chat/completions",
            json=CHAT,
            headers={"Authorization": f"Bearer {ALICE}", "X-Mock-Mode": "error:500"},
        )
        assert failed.status_code == 500
        assert raw.post("/chat/completions", json=CHAT).status_code == 401
        spent = raw.post(
            "/chat/completions", json={**CHAT, "max_tokens": 990}, headers={"X-API-Key": BOB}
        )
        assert spent.status_code == 200
    with (
        openai.OpenAI(base_url=base, api_key=BOB, max_retries=0) as bob,
        pytest.raises(openai.RateLimitError),
    ):
        bob.chat.completions.create(**CHAT, max_tokens=5)


def test_tokens_match_what_the_mock_served(scraped):
    served = scraped.served["tokens_served"]
    tokens = "tokengate_tokens_total"
    assert scraped.value(tokens, dimension="prompt", usage_source="reported") == served["prompt"]
    assert (
        scraped.value(tokens, dimension="completion") == served["completion"] == 20 + 7 + 15 + 990
    )
    assert scraped.value(tokens, key="alice", dimension="completion") == 42
    usage = "gen_ai_client_token_usage_sum"
    assert scraped.value(usage, gen_ai_token_type="input") == served["prompt"]
    assert (
        scraped.value(usage, gen_ai_token_type="output", gen_ai_operation_name="chat")
        == (served["completion"])
    )
    # The mock bills with the gate's own tokenizer: the estimate is exact.
    ratio = "tokengate_prompt_estimate_ratio"
    assert scraped.value(ratio + "_sum") == scraped.value(ratio + "_count") == 4


def test_statuses_and_decisions_match_what_happened(scraped):
    requests = "tokengate_requests_total"
    provider = scraped.value(requests, source="provider")
    assert provider == scraped.served["requests"] == scraped.served["authorized"] == 5
    assert scraped.value(requests, key="alice", status="200", decision="admitted") == 3
    assert scraped.value(requests, key="alice", status="500", source="provider") == 1
    assert scraped.value(requests, key="bob", status="200") == 1
    refused = {"status": "429", "decision": "refused", "limit": "total_tokens-1m"}
    assert scraped.value(requests, key="bob", source="gate", **refused) == 1
    assert scraped.value(requests, status="401", decision="unauthorized", source="gate") == 1
    assert scraped.value(requests) == 7
    assert scraped.value("tokengate_overhead_seconds_count", source="gate") == 2
    assert scraped.value("tokengate_overhead_seconds_count", source="provider") == 5
    assert scraped.value("tokengate_store_up", store="sqlite") == 1
    assert scraped.value("tokengate_reservations_in_flight") == 0
    for key in ("alice", "bob"):
        spent = scraped.value("tokengate_tokens_total", key=key)
        assert scraped.value("tokengate_quota_remaining", key=key) == 1000 - spent


def test_the_page_names_keys_never_holds_them(scraped):
    assert 'key="alice"' in scraped.page
    for secret in (ALICE, BOB, PROVIDER_KEY):
        assert secret not in scraped.page


def test_the_server_stops_with_mitmdump(scraped):
    assert "Traceback" not in scraped.log, scraped.log


def promql_names(expression: str) -> set[str]:
    return set(NAMES.findall(expression))


def check_names(expressions: list[str], scraped: Scraped) -> None:
    """Every metric an expression names is on the page; labels of ours are labels there."""
    metrics, labels = scraped.names(), scraped.label_names()
    assert expressions
    for expression in expressions:
        names = promql_names(expression)
        assert names & metrics, f"names none of our metrics: {expression}"
        unknown = names - metrics - labels
        assert not unknown, f"{sorted(unknown)} in {expression}"


def test_the_dashboard_queries_name_metrics_that_exist(scraped):
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"]
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    expressions += [
        v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"
    ]
    assert all(panel["datasource"]["uid"] == "${datasource}" for panel in dashboard["panels"])
    check_names(expressions, scraped)


def test_the_alert_rules_parse_and_name_metrics_that_exist(scraped):
    """promtool is not a test dependency: the structure of Prometheus rule groups is checked
    here, and each expression's metric names against a real page."""
    rules = yaml.safe_load((ROOT / "docs" / "prometheus-alerts.yml").read_text())
    assert set(rules) == {"groups"}
    expressions = []
    for group in rules["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["name"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["alert"] and isinstance(rule["expr"], str)
            assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s"))
            expressions.append(rule["expr"])
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert {
        "TokenGateBudgetMostlySpent",
        "TokenGateKeyRefusedOften",
        "TokenGateStoreDown",
        "TokenGateEstimateDrifting",
        "TokenGateProviderErrors",
    } <= alerts
    check_names(expressions, scraped)
