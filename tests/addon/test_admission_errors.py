"""An unexpected error while admitting fails closed: the gate answers 500 in the caller's
dialect, nothing goes upstream, nothing stays reserved, and the log says where it failed
without quoting the error's message (which may carry request data) or any key."""

from __future__ import annotations

import json
import logging

import pytest
from mitmproxy.proxy.layers import http
from tokengate_core import admission, notes
from tokengate_core.dialects.anthropic import Anthropic
from tokengate_core.dialects.openai import OpenAI
from tokengate_core.reporting import Reporting

from tests.support.captures import ledger
from tests.support.harness import gate_in_harness, reverse_flow
from tests.support.processes import PROVIDER_KEY
from tests.support.quotas import ALICE, PROXIES

MESSAGE = "quoted: " + ALICE  # an error whose message quotes a key


def fail_here(*args, **kwargs):
    raise RuntimeError(MESSAGE)


# (dialect kind, path, what raises, where): before routing, at the key, after the reservation.
CASES = [
    ("openai", "/p/chat/completions", (admission, "route"), "requestheaders"),
    ("openai", "/p/chat/completions", (OpenAI, "caller_key"), "requestheaders"),
    ("openai", "/p/chat/completions", (OpenAI, "adjust"), "request"),
    ("anthropic", "/p/v1/messages", (Anthropic, "adjust"), "request"),
]


@pytest.mark.parametrize(("kind", "path", "target", "hook"), CASES)
async def test_an_unexpected_error_answers_500_and_holds_nothing(
    tmp_path, monkeypatch, caplog, kind, path, target, hook
):
    with gate_in_harness(tmp_path, monkeypatch, PROXIES, kind=kind) as (tctx, gate, addons):
        (reporting,) = [addon for addon in addons if isinstance(addon, Reporting)]
        tctx.configure(reporting, tokengate_ledger=str(tmp_path / "ledger.jsonl"))
        reporting.running()
        monkeypatch.setattr(*target, fail_here)
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}
        flow = reverse_flow(path=path, body={**body, "max_tokens": 20})
        if kind == "anthropic":
            flow.request.headers["anthropic-version"] = "2023-06-01"
        with caplog.at_level(logging.ERROR, "tokengate"):
            # mitmproxy's own dispatch: an addon's error is logged and the next addons run, as
            # live (the credential swap would then set the provider key and send it).
            for event in (http.HttpRequestHeadersHook, http.HttpRequestHook):
                await tctx.master.addons.handle_lifecycle(event(flow))
            if flow.response is not None:
                await tctx.master.addons.handle_lifecycle(http.HttpResponseHook(flow))
        quota = addons[2].quota
        standing = await quota.standing(gate.proxy("p"), "alice")  # writes caught up
        reporting.done()
    # Never forwarded: no provider key was set on the request, and the gate answered it.
    assert PROVIDER_KEY not in str(flow.request.headers)
    assert flow.response is not None
    assert flow.metadata[notes.META]["answered_by_gate"] == 500
    assert flow.response.headers["X-TokenGate-Source"] == "gateway"
    answer = json.loads(flow.response.content)
    if kind == "anthropic":
        assert answer["type"] == "error" and answer["error"]["type"] == "api_error"
    else:
        assert (answer["error"]["type"], answer["error"]["code"]) == (
            "server_error",
            "gateway_error",
        )
    assert "not sent" in flow.response.text
    # Nothing held: no reservation in the quota service, none in the store.
    assert quota.in_flight == 0
    assert [status.reserved for status in standing] == [0]
    (line,) = ledger(tmp_path / "ledger.jsonl")
    assert (line["status"], line["decision"]) == (500, "gate_error")
    # Logged where it failed, without the message or a key.
    (record,) = [r for r in caplog.records if "unexpected error in admission" in r.getMessage()]
    logged = record.getMessage()
    assert "RuntimeError at test_admission_errors.py:" in logged and hook in logged
    assert "nothing forwarded" in logged
    assert ALICE not in caplog.text and "quoted" not in caplog.text
