"""An Anthropic provider inside mitmproxy's test harness: what goes upstream, what the gate
answers itself, and what a caller of a streamed message receives."""

from __future__ import annotations

import json

import pytest
from mitmproxy.test import tutils
from tokengate_core import notes
from tokengate_core.metering import LOWERED_HEADER
from tokengate_core.quota import buckets_for
from tokengate_core.tools import mock_anthropic
from tokengate_core.tools.mock import Completion, completion_pieces, render

from tests.support.harness import gate_in_harness, reverse_flow, through
from tests.support.processes import PROVIDER_KEY
from tests.support.quotas import ALICE, key_entries

MODEL = "claude-sonnet-4-5"
HELLO = [{"role": "user", "content": "Hello!"}]
PROXIES = (
    "  p:\n    context: /p\n    provider: mock\n"
    "    token_limits:\n      total_tokens:\n        - {count: 1000, duration: 1m}\n"
    "    keys:\n" + key_entries(alice=ALICE) + "store:\n  kind: memory\n"
)


@pytest.fixture
def addons(tmp_path, monkeypatch):
    with gate_in_harness(tmp_path, monkeypatch, PROXIES, kind="anthropic") as (_, gate, addons):
        yield gate, addons


def message_flow(path="/p/v1/messages", body=None, headers=()):
    body = body or {"model": MODEL, "max_tokens": 50, "messages": HELLO}
    flow = reverse_flow(path=path, key=None, body=body)
    flow.request.headers.update({"x-api-key": ALICE, **dict(headers)})
    return flow


async def held(gate) -> int:
    await gate.writes.caught_up()  # the settlements handed over
    (window,) = await gate.store.status(buckets_for(gate.proxy("p"), "alice"))
    return window.reserved


async def test_count_tokens_passes_unmetered_with_the_provider_key(addons):
    gate, pipeline = addons
    flow = message_flow("/p/v1/messages/count_tokens", headers={"anthropic-version": "2023-06-01"})
    await through(pipeline, ("requestheaders", "request"), flow)
    assert flow.response is None
    assert flow.request.headers["x-api-key"] == PROVIDER_KEY
    assert flow.request.headers["anthropic-version"] == "2023-06-01"
    assert flow.request.path == "/v1/v1/messages/count_tokens"  # the mock's base_url ends in /v1
    assert notes.of(flow)["endpoint"] is None and await held(gate) == 0


async def test_a_message_without_max_tokens_is_refused_before_it_costs_anything(addons):
    gate, pipeline = addons
    flow = message_flow(body={"model": MODEL, "messages": HELLO})
    await through(pipeline, ("requestheaders", "request"), flow)
    assert flow.response.status_code == 400
    assert json.loads(flow.response.content)["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens: a whole number of at least 1 is required",
    }
    assert PROVIDER_KEY not in str(flow.request.headers) and await held(gate) == 0


async def test_max_tokens_above_what_is_left_is_lowered_and_said(addons):
    _, pipeline = addons
    flow = message_flow(body={"model": MODEL, "max_tokens": 5000, "messages": HELLO})
    await through(pipeline, ("requestheaders", "request"), flow)
    sent = json.loads(flow.request.content)
    prompt = notes.of(flow)["reserved"]["prompt_tokens"]
    # The dialect's estimate carries its own margin: no cold margin on top of it.
    assert prompt == notes.of(flow)["prompt_estimate"]
    assert sent["max_tokens"] == 1000 - prompt
    flow.response = tutils.tresp(content=b"{}")
    await through(pipeline, ("responseheaders",), flow)
    assert flow.response.headers[LOWERED_HEADER] == str(1000 - prompt)


async def test_a_streamed_message_gets_the_trailer_before_message_stop(addons):
    gate, pipeline = addons
    flow = message_flow(body={"model": MODEL, "max_tokens": 20, "stream": True, "messages": HELLO})
    await through(pipeline, ("requestheaders", "request"), flow)
    flow.response = tutils.tresp(content=None)
    flow.response.headers["content-type"] = "text/event-stream"
    await through(pipeline, ("responseheaders",), flow)
    assert flow.response.headers["anthropic-ratelimit-tokens-limit"] == "1000"
    completion = Completion(MODEL, completion_pieces(MODEL, 20), "stop", 30, 20, True)
    events = mock_anthropic.Message(completion, None, (0, 0)).events()
    received = b"".join(b"".join(flow.response.stream(render(event))) for event in events)
    received += b"".join(flow.response.stream(b""))
    await through(pipeline, ("response",), flow)
    trailer = b": x-ratelimit-remaining-tokens=950 x-tokens-consumed=50\n\n"
    assert received.endswith(trailer + render(events[-1]))
    assert notes.of(flow)["usage"]["total_tokens"] == 50 and await held(gate) == 0
