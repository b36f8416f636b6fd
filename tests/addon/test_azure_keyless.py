"""Azure and keyless providers inside mitmproxy's harness: where the flow goes, which key
travels upstream (and none for a keyless provider), the model noted, and what a saved flow
keeps."""

from __future__ import annotations

import json

import pytest
from mitmproxy.test import taddons, tutils
from tokengate_core import notes, pipeline
from tokengate_core.gate import Gate

from tests.support.harness import reverse_flow, through
from tests.support.processes import PROVIDER_KEY, credentials_in
from tests.support.quotas import ALICE, BOB, key_entries

QUOTAS = """\
providers:
  azure:
    kind: azure
    base_url: https://my-resource.openai.azure.com
    api_key_env: TOKENGATE_TEST_PROVIDER_KEY
    deployments: {gpt4o-prod: gpt-4o}
  local:
    base_url: http://127.0.0.1:11434/v1
proxies:
"""
LIMITS = "    token_limits:\n      total_tokens:\n        - {count: 1000, duration: 1m}\n"
PROXIES = "".join(
    f"  {name}:\n    context: /{name}\n    provider: {provider}\n{LIMITS}    keys:\n"
    + key_entries(**{caller: key})
    for name, provider, caller, key in (
        ("az", "azure", "alice", ALICE),
        ("llm", "local", "bob", BOB),
    )
)
HELLO = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 20}
ANSWER = {
    "model": "gpt-4o-2024-08-06",
    "choices": [{"message": {"role": "assistant", "content": "Hi"}}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
}
SENT = ("requestheaders", "request")
ANSWERED = ("responseheaders", "response")


@pytest.fixture
def addons(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENGATE_TEST_PROVIDER_KEY", PROVIDER_KEY)
    quotas = tmp_path / "quotas.yaml"
    quotas.write_text(QUOTAS + PROXIES, encoding="utf-8")
    built = pipeline.build(Gate(clock=lambda: 1_000_000.0))
    with taddons.context(*built) as tctx:
        tctx.configure(built[0], tokengate_config=str(quotas))
        yield built


def azure_flow(path: str, body=HELLO):
    flow = reverse_flow(path, key=None, body=body)
    flow.request.headers["api-key"] = ALICE  # what openai.AzureOpenAI sends
    return flow


async def test_an_azure_deployment_call_goes_with_the_provider_key_in_api_key(addons):
    path = "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    flow = azure_flow("/az" + path)
    await through(addons, SENT, flow)
    assert flow.response is None, flow.response and flow.response.text
    assert flow.request.url == "https://my-resource.openai.azure.com" + path
    assert credentials_in(flow.request.headers) == ["api-key"]
    assert flow.request.headers["api-key"] == PROVIDER_KEY
    note = notes.of(flow)
    assert (note["deployment"], note["model"], note["endpoint"]) == (
        "gpt4o-prod",
        "gpt-4o",
        "chat/completions",
    )
    flow.response = tutils.tresp(content=json.dumps(ANSWER).encode())
    flow.response.headers["content-type"] = "application/json"
    await through(addons, ANSWERED, flow)
    assert note["usage"]["total_tokens"] == 11
    assert PROVIDER_KEY not in str(flow.request.headers)  # what a saved flow keeps: no key
    assert flow.response.headers["X-Tokens-Consumed"] == "11"


async def test_the_v1_api_takes_the_deployment_from_the_body(addons):
    flow = azure_flow("/az/openai/v1/chat/completions", {**HELLO, "model": "gpt4o-prod"})
    flow.request.headers["authorization"] = f"Bearer {ALICE}"  # the OpenAI client's way
    await through(addons, SENT, flow)
    assert flow.response is None, flow.response and flow.response.text
    assert notes.of(flow)["model"] == "gpt-4o"
    assert credentials_in(flow.request.headers) == ["api-key"]


async def test_an_unmetered_azure_path_is_refused(addons):
    flow = azure_flow("/az/openai/deployments/gpt4o-prod/images/generations?api-version=1")
    await through(addons, SENT, flow)
    assert flow.response.status_code == 403
    assert "deployment's chat/completions" in flow.response.json()["error"]["message"]


@pytest.mark.parametrize("header", ["authorization", "x-api-key", "api-key"])
async def test_a_keyless_provider_gets_no_credential_at_all(addons, header):
    flow = reverse_flow("/llm/chat/completions", key=None, body={**HELLO, "model": "llama3"})
    flow.request.headers[header] = f"Bearer {BOB}" if header == "authorization" else BOB
    await through(addons, SENT, flow)
    assert flow.response is None, flow.response and flow.response.text
    assert flow.request.url == "http://127.0.0.1:11434/v1/chat/completions"
    assert credentials_in(flow.request.headers) == []
    flow.response = tutils.tresp(content=json.dumps(ANSWER).encode())
    await through(addons, ANSWERED, flow)
    assert credentials_in(flow.request.headers) == []  # no placeholder put back either
    assert notes.of(flow)["usage"]["total_tokens"] == 11
