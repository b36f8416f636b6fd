"""The addon classes inside mitmproxy's test harness (taddons / tflow), without processes."""

from __future__ import annotations

import json

import pytest
from mitmproxy import exceptions
from mitmproxy.test import tflow, tutils
from tokengate_core import notes
from tokengate_core.admission import AdmissionControl
from tokengate_core.credentials import REDACTED_KEY, CredentialSwap
from tokengate_core.metering import Metering
from tokengate_core.quota import buckets_for

from tests.support.harness import reverse_flow, through
from tests.support.processes import PROVIDER_KEY, credentials_in, write_quotas
from tests.support.quotas import ALICE, key_entries


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


@pytest.mark.parametrize(
    ("key", "host"),
    [(None, "upstream.test"), ("sk-not-ours", "elsewhere.test")],
    ids=["no-credential", "foreign-credential-to-another-host"],
)
async def test_unrouted_flow_is_untouched(gate_addons, key, host):
    _, _, addons = gate_addons
    flow = reverse_flow(path="/elsewhere/chat/completions", key=key)
    flow.request.host = host
    before = flow.request.copy()
    await through(addons, ("requestheaders", "request"), flow)
    assert notes.of(flow) is None
    assert flow.response is None
    assert flow.request.headers == before.headers and flow.request.url == before.url


@pytest.mark.parametrize(
    ("path", "key", "host"),
    [
        ("/P/chat/completions", ALICE, "elsewhere.test"),  # our key, a typo of the context
        ("/px/chat/completions", ALICE, "elsewhere.test"),
        ("/v1/chat/completions", "sk-anything", "upstream.test"),  # any key, to the provider
    ],
)
async def test_unrouted_flow_with_a_credential_is_refused_404(gate_addons, path, key, host):
    tctx, _, addons = gate_addons
    flow = reverse_flow(path=path, key=key)
    flow.request.host = host
    await through(addons, ("requestheaders", "request"), flow)
    assert flow.response.status_code == 404 and notes.answered_by_gate(flow)
    assert credentials_in(flow.request.headers) == []  # a saved flow keeps no key
    body = json.loads(flow.response.content)
    assert body["error"]["code"] == "unknown_url" and "/p" in body["error"]["message"]
    # The documented way through: a passthrough prefix is forwarded untouched.
    (admission,) = [a for a in addons if isinstance(a, AdmissionControl)]
    tctx.configure(admission, tokengate_passthrough=[path.rsplit("/", 2)[0]])
    passing = reverse_flow(path=path, key=key)
    passing.request.host = host
    await through(addons, ("requestheaders", "request"), passing)
    assert passing.response is None and notes.of(passing) is None
    assert passing.request.headers["authorization"] == f"Bearer {key}"


def test_passthrough_prefixes_are_paths(gate_addons):
    tctx, _, addons = gate_addons
    (admission,) = [a for a in addons if isinstance(a, AdmissionControl)]
    with pytest.raises(exceptions.OptionsError, match="starts with /"):
        tctx.configure(admission, tokengate_passthrough=["v1"])


def test_the_cold_margin_is_a_number_from_1_to_4(gate_addons):
    """mitmproxy options have no float type: the margin is text, read as a number."""
    tctx, gate, addons = gate_addons
    (admission,) = [a for a in addons if isinstance(a, AdmissionControl)]
    tctx.configure(admission, tokengate_estimate_margin="1.5")
    assert gate.estimates.policy.margin == 1.5
    for bad in ("0.9", "4.5", "nan", "x", ""):
        with pytest.raises(exceptions.OptionsError, match="a number from 1 to 4"):
            tctx.configure(admission, tokengate_estimate_margin=bad)
    assert gate.estimates.policy.margin == 1.5


async def test_missing_key_is_answered_401_by_the_gate(gate_addons):
    _, _, addons = gate_addons
    flow = reverse_flow(key=None)
    # Credentials, but no TokenGate key: not a bearer token, an empty one, an unknown one.
    flow.request.headers["authorization"] = "Basic YWxpY2U6c2VjcmV0"
    flow.request.headers["X-API-Key"] = ""
    flow.request.headers["api-key"] = "tg-not-a-key"
    await through(addons, ("requestheaders", "request"), flow)
    assert flow.response.status_code == 401
    assert notes.answered_by_gate(flow)
    assert credentials_in(flow.request.headers) == []  # the saved flow keeps none


async def test_a_flow_the_gate_refuses_after_finding_the_key_never_gets_the_provider_key(
    gate_addons,
):
    _, _, addons = gate_addons
    flow = reverse_flow(path="/p/files")  # alice's key is good; the endpoint is not served
    await through(addons, ("requestheaders",), flow)
    assert flow.response.status_code == 403 and notes.of(flow)["proxy"] == "p"
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
    assert flow.request.headers["authorization"] == f"Bearer {REDACTED_KEY}"
    assert flow.response.headers["X-Tokens-Consumed"] == "20"
    assert flow.response.headers["X-RateLimit-Remaining"] == "980"
    assert notes.of(flow)["usage"]["source"] == "reported"
    json.dumps(flow.metadata)  # plain data only: mitmproxy saves it with the flow


@pytest.mark.parametrize("connected", [False, True], ids=["before-connecting", "after-sending"])
async def test_a_failed_flow_shows_the_url_it_was_sent_to_and_keeps_nothing(gate_addons, connected):
    _, _, addons = gate_addons
    (swap,) = [addon for addon in addons if isinstance(addon, CredentialSwap)]
    flow = reverse_flow()
    await through(addons, ("requestheaders", "request"), flow)
    assert flow.request.url == "http://upstream.test:8000/v1/chat/completions"
    flow.server_conn.timestamp_start = 1.0 if connected else None
    flow.error = tflow.terr("Connection refused" if not connected else "Server disconnected.")
    await through(addons, ("error",), flow)
    assert flow.request.headers.get_all("authorization") == [f"Bearer {REDACTED_KEY}"]
    expected = (
        "http://upstream.test:8000/v1/chat/completions"
        if connected
        else (
            "http://address:22/p/chat/completions"  # never reached the provider: the caller's
        )
    )
    assert flow.request.url == expected
    assert not swap._carrying_key and not swap._answering


async def test_a_flow_the_gate_answered_may_still_end_in_error(gate_addons):
    _, _, addons = gate_addons
    flow = reverse_flow(key=None)
    await through(addons, ("requestheaders", "request"), flow)
    assert flow.response.status_code == 401
    flow.error = tflow.terr("Client disconnected.")
    await through(addons, ("error",), flow)  # no hook raises for a flow that was never sent
    assert flow.request.url == "http://address:22/p/chat/completions"


async def test_a_flow_refused_after_its_body_was_read_shows_the_callers_url(gate_addons):
    _, _, addons = gate_addons
    (swap,) = [addon for addon in addons if isinstance(addon, CredentialSwap)]
    huge = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    flow = reverse_flow(body={**huge, "messages": [{"role": "user", "content": "word " * 2000}]})
    await through(addons, ("requestheaders", "request"), flow)
    assert flow.response.status_code == 429  # the prompt alone is over the 1000 limit
    assert flow.request.url == "http://address:22/p/chat/completions"
    assert flow.request.headers.get_all("authorization") == [f"Bearer {REDACTED_KEY}"]
    assert not swap._carrying_key and not swap._answering


async def test_a_flow_still_out_at_shutdown_is_redacted(gate_addons):
    _, _, addons = gate_addons
    (swap,) = [addon for addon in addons if isinstance(addon, CredentialSwap)]
    flow = reverse_flow()
    await through(addons, ("requestheaders", "request"), flow)
    assert flow.request.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    swap.done()  # mitmdump stops with the request still waiting for its answer
    assert flow.request.headers.get_all("authorization") == [f"Bearer {REDACTED_KEY}"]
    assert flow.request.url == "http://upstream.test:8000/v1/chat/completions"  # where it went


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


@pytest.mark.parametrize("streamed", [False, True], ids=["json", "sse"])
async def test_a_flow_whose_proxy_a_reload_removed_still_settles(gate_addons, tmp_path, streamed):
    tctx, gate, addons = gate_addons
    store, old = gate.store, gate.proxy("p")
    flow = reverse_flow()
    await through(addons, ("requestheaders", "request"), flow)
    other = "  q:\n    context: /q\n    provider: mock\n    keys:\n" + key_entries(bob="tg-b")
    tctx.configure(
        addons[0],
        tokengate_config=str(write_quotas(tmp_path / "q.yaml", "http://upstream.test:8000", other)),
    )
    assert gate.proxy("p") is None
    usage = {"usage": {"prompt_tokens": 9, "completion_tokens": 11}}
    if streamed:
        flow.response = tutils.tresp(content=None)
        flow.response.headers["content-type"] = "text/event-stream"
        await through(addons, ("responseheaders",), flow)
        for chunk in (f"data: {json.dumps({'choices': [], **usage})}\n\n".encode(), b""):
            flow.response.stream(chunk)
        await through(addons, ("response",), flow)
    else:
        flow.response = tutils.tresp(content=json.dumps(usage).encode())
        await through(addons, ("responseheaders", "response"), flow)
    assert notes.of(flow)["usage"]["total_tokens"] == 20
    await gate.writes.caught_up()
    (status,) = await store.status(buckets_for(old, "alice"))
    assert (status.used, status.reserved) == (20, 0)
