"""The addon classes inside mitmproxy's test harness (taddons / tflow), without processes."""

from __future__ import annotations

import json

import pytest
from mitmproxy import exceptions
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow, tutils
from tokengate_core import flowstate
from tokengate_core.credentials import REDACTED, CredentialSwap
from tokengate_core.metering import Metering, buckets_for
from tokengate_core.settings import Gate

from tests.conftest import ALICE, key_entries
from tests.e2e import PROVIDER_KEY, credentials_in
from tests.harness import gate_in_harness

PROXIES = (
    "  p:\n    context: /p\n    provider: mock\n"
    "    token_limits:\n      total_tokens:\n        - {count: 1000, duration: 1m}\n"
    "    keys:\n" + key_entries(alice=ALICE)
)


@pytest.fixture
def gate_addons(tmp_path, monkeypatch):
    with gate_in_harness(
        tmp_path, monkeypatch, PROXIES, Gate(clock=lambda: 1_000_000.0)
    ) as harnessed:
        yield harnessed


def reverse_flow(path="/p/chat/completions", key=ALICE, body=None):
    flow = tflow.tflow()
    flow.client_conn.proxy_mode = ProxyMode.parse("reverse:http://upstream.test:8000")
    flow.request.method = "POST"
    flow.request.path = path
    if key:
        flow.request.headers["authorization"] = f"Bearer {key}"
    payload = body or {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello!"}]}
    flow.request.content = json.dumps(payload).encode()
    return flow


async def _call(addon, hook, flow):
    result = getattr(addon, hook)(flow)
    if hasattr(result, "__await__"):
        await result


async def through(addons, hooks, flow):
    for hook in hooks:
        for addon in addons:
            if hasattr(addon, hook):
                await _call(addon, hook, flow)


def test_bad_reload_keeps_last_good_config(gate_addons, tmp_path):
    tctx, gate, addons = gate_addons
    good = gate.config.path
    broken = tmp_path / "broken.yaml"
    broken.write_text("providers: {}\nproxies:\n  p: {context: /p, provider: none}\n")
    with pytest.raises(exceptions.OptionsError, match=r"broken.yaml:3: provider 'none'"):
        tctx.configure(addons[0], tokengate_config=str(broken))
    # mitmproxy rolls the option back, which loads the last good file again
    assert gate.config.path == good
    assert gate.proxy("p") is not None


async def test_unrouted_flow_is_untouched(gate_addons):
    _, _, addons = gate_addons
    flow = reverse_flow(path="/elsewhere/chat/completions")
    before = flow.request.copy()
    await through(addons, ("requestheaders", "request"), flow)
    assert flowstate.governed(flow) is None
    assert flow.response is None
    assert flow.request.headers == before.headers and flow.request.url == before.url


async def test_missing_key_is_answered_401_by_the_gate(gate_addons):
    _, _, addons = gate_addons
    flow = reverse_flow(key=None)
    # Credentials, but no TokenGate key: not a bearer token, an empty one, an unknown one.
    flow.request.headers["authorization"] = "Basic YWxpY2U6c2VjcmV0"
    flow.request.headers["X-API-Key"] = ""
    flow.request.headers["api-key"] = "tg-not-a-key"
    await through(addons, ("requestheaders", "request"), flow)
    assert flow.response.status_code == 401
    assert flowstate.answered_by_gate(flow)
    assert credentials_in(flow.request.headers) == []  # the saved flow keeps none


async def test_a_flow_the_gate_refuses_after_finding_the_key_never_gets_the_provider_key(
    gate_addons,
):
    _, _, addons = gate_addons
    flow = reverse_flow(path="/p/files")  # alice's key is good; the endpoint is not served
    await through(addons, ("requestheaders",), flow)
    assert flow.response.status_code == 403 and flowstate.governed(flow)["proxy"] == "p"
    assert credentials_in(flow.request.headers) == []
    assert flow.request.url == "http://address:22/p/files"  # the caller's, not rewritten
    await through(addons, ("request",), flow)
    assert credentials_in(flow.request.headers) == []


async def test_key_swap_rewrite_and_redaction(gate_addons):
    _, _, addons = gate_addons
    flow = reverse_flow()
    flow.request.headers["X-API-Key"] = ALICE  # the same key in every caller header
    flow.request.headers["Api-Key"] = ALICE  # Azure's form
    await through(addons, ("requestheaders", "request"), flow)
    assert flow.response is None
    assert flow.request.url == "http://upstream.test:8000/v1/chat/completions"
    assert flow.request.headers.get_all("authorization") == [f"Bearer {PROVIDER_KEY}"]
    assert credentials_in(flow.request.headers) == ["authorization"]
    assert flow.request.headers["accept-encoding"] == "identity"
    flow.response = tutils.tresp(
        content=json.dumps({"usage": {"prompt_tokens": 9, "completion_tokens": 11}}).encode()
    )
    await through(addons, ("responseheaders", "response"), flow)
    assert flow.request.headers["authorization"] == REDACTED
    assert flow.response.headers["X-Tokens-Consumed"] == "20"
    assert flow.response.headers["X-RateLimit-Remaining"] == "980"
    assert flowstate.governed(flow)["usage"]["source"] == "reported"
    json.dumps(flow.metadata)  # plain data only: mitmproxy saves it with the flow


async def test_a_flow_still_out_at_shutdown_is_redacted(gate_addons):
    _, _, addons = gate_addons
    (swap,) = [addon for addon in addons if isinstance(addon, CredentialSwap)]
    flow = reverse_flow()
    await through(addons, ("requestheaders", "request"), flow)
    assert flow.request.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    swap.done()  # mitmdump stops with the request still waiting for its answer
    assert flow.request.headers.get_all("authorization") == [REDACTED]
    assert flow.request.url == "http://address:22/p/chat/completions"  # the caller's again


async def test_settles_once_and_error_releases(gate_addons):
    _, gate, addons = gate_addons
    (metering,) = [addon for addon in addons if isinstance(addon, Metering)]
    flow = reverse_flow()
    await through(addons, ("requestheaders", "request"), flow)
    flow.response = tutils.tresp(
        content=json.dumps({"usage": {"prompt_tokens": 9, "completion_tokens": 91}}).encode()
    )
    await through(addons, ("responseheaders", "response"), flow)
    metering.response(flow)  # a second settlement finds nothing to charge
    metering.error(flow)
    failed = reverse_flow()
    await through(addons, ("requestheaders", "request"), failed)
    await through(addons, ("error",), failed)
    await gate.writes.caught_up()
    (status,) = await gate.store.status(buckets_for(gate.proxy("p"), "alice"))
    assert (status.used, status.reserved) == (100, 0)
