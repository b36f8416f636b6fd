"""Metering inside mitmproxy's test harness: what goes upstream, what a stream's caller receives,
and the queue that lets a burst wait for in-flight reservations instead of getting 429."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
from mitmproxy.connection import ConnectionState
from mitmproxy.test import tflow, tutils
from tokengate_core import notes
from tokengate_core.dialects.openai import MAX_COMPLETIONS, completions_requested
from tokengate_core.metering import LOWERED_HEADER, Metering
from tokengate_core.quota import buckets_for

from tests.support.harness import nested_in_content, reverse_flow, through

HELLO = [{"role": "user", "content": "Hello!"}]
HELLO_PROMPT = 9  # gpt-4o-mini's estimate of HELLO with chat framing


def chat(**fields):
    return {"model": "gpt-4o-mini", "messages": HELLO, **fields}


async def sent_upstream(addons, body, path="/p/chat/completions"):
    flow = reverse_flow(path=path, body=body)
    await through(addons, ("requestheaders", "request"), flow)
    assert flow.response is None, flow.response and flow.response.text
    return flow


async def test_streamed_chat_asks_the_provider_for_usage(make_gate):
    _, addons, _ = make_gate()
    flow = await sent_upstream(addons, chat(stream=True, stream_options={"other": 1}))
    body = json.loads(flow.request.content)
    assert body["stream_options"] == {"other": 1, "include_usage": True}
    assert flow.request.headers["content-length"] == str(len(flow.request.content))
    assert notes.of(flow)["usage_injected"] is True
    text = await sent_upstream(
        addons, {"model": "gpt-4o-mini", "prompt": "Hi", "stream": True}, "/p/completions"
    )
    assert json.loads(text.request.content)["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    "body, path",
    [
        (chat(stream=True, stream_options={"include_usage": True}), "/p/chat/completions"),
        (chat(), "/p/chat/completions"),
        ({"model": "gpt-4o-mini", "input": "Hi", "stream": True}, "/p/responses"),
    ],
    ids=["caller-asked", "not-streamed", "responses-api"],
)
async def test_requests_the_gate_need_not_change_leave_byte_for_byte(make_gate, body, path):
    _, addons, _ = make_gate()
    raw = json.dumps(body).encode()
    flow = await sent_upstream(addons, body, path)
    assert flow.request.content == raw
    assert "usage_injected" not in notes.of(flow)


async def test_max_tokens_above_the_budget_left_is_lowered_to_it(make_gate):
    _, addons, _ = make_gate(count=100)
    flow = await sent_upstream(addons, chat(max_completion_tokens=500))
    assert json.loads(flow.request.content)["max_completion_tokens"] == 100 - HELLO_PROMPT
    assert notes.of(flow)["max_tokens_lowered_to"] == 100 - HELLO_PROMPT
    assert notes.of(flow)["max_tokens_requested"] == 500
    await settle(addons, flow, completion=100 - HELLO_PROMPT)
    assert flow.response.headers[LOWERED_HEADER] == str(100 - HELLO_PROMPT)
    roomy = make_gate(count=1000)[1]
    fits = await sent_upstream(roomy, chat(max_tokens=50))
    assert json.loads(fits.request.content)["max_tokens"] == 50
    await settle(roomy, fits, completion=50)
    assert fits.response.headers["X-Tokens-Consumed"] == str(HELLO_PROMPT + 50)
    assert LOWERED_HEADER not in fits.response.headers
    assert "max_tokens_requested" not in notes.of(fits)


async def test_a_lone_surrogate_cannot_keep_max_tokens_from_being_lowered(make_gate):
    _, addons, _ = make_gate(count=100)
    raw = '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\\ud800"}], '
    flow = reverse_flow(body=chat())
    flow.request.content = (raw + '"max_tokens": 500}').encode()
    await through(addons, ("requestheaders", "request"), flow)
    assert flow.response is None
    sent = json.loads(flow.request.content)
    assert sent["messages"][0]["content"] == "\ud800"  # passed on as the caller wrote it
    assert sent["max_tokens"] == notes.of(flow)["max_tokens_lowered_to"] < 100


@pytest.mark.parametrize(
    "raw",
    [
        '{"model": "gpt-4o-mini", "messages": [], "metadata": ' + "[" * 5000 + "]" * 5000 + "}",
        nested_in_content(sys.getrecursionlimit() + 100),
    ],
    ids=["too-deep-to-parse", "too-deep-to-count"],
)
async def test_body_nested_too_deeply_is_refused_before_it_leaves(make_gate, raw):
    gate, addons, _ = make_gate()
    flow = reverse_flow(body=chat())
    flow.request.content = raw.encode()
    await through(addons, ("requestheaders", "request"), flow)
    assert flow.response.status_code == 400 and notes.answered_by_gate(flow)
    message = json.loads(flow.response.content)["error"]["message"]
    assert message.endswith("it nests more deeply than the gateway reads.")
    await gate.writes.caught_up()  # the settlements handed over
    (status,) = await gate.store.status(buckets_for(gate.proxy("p"), "alice"))
    assert (status.used, status.reserved) == (0, 0)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"model": "gpt-4o-mini", "messages": [', "it is not valid JSON (in UTF-8)"),
        (b'{"model": "\xff"}', "it is not valid JSON (in UTF-8)"),
        (b'[{"model": "gpt-4o-mini"}]', "expected a JSON object"),
    ],
    ids=["truncated", "not-utf8", "array"],
)
async def test_unreadable_body_is_refused_saying_why(make_gate, raw, reason):
    _, addons, _ = make_gate()
    flow = reverse_flow(body=chat())
    flow.request.content = raw
    await through(addons, ("requestheaders", "request"), flow)
    assert flow.response.status_code == 400
    message = json.loads(flow.response.content)["error"]["message"]
    assert message == f"We could not parse the JSON body of your request: {reason}."


async def test_answer_nested_too_deeply_is_charged_the_tokenizer_count(make_gate):
    gate, addons, _ = make_gate()
    flow = await sent_upstream(addons, chat(max_tokens=50))
    flow.response = tutils.tresp(content=b'{"usage": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    await through(addons, ("responseheaders", "response"), flow)
    assert notes.of(flow)["usage"]["source"] == "estimated"
    await gate.writes.caught_up()  # the settlements handed over
    (status,) = await gate.store.status(buckets_for(gate.proxy("p"), "alice"))
    assert (status.used, status.reserved) == (HELLO_PROMPT, 0)


TEXT = {"model": "gpt-4o-mini", "prompt": "Hi", "max_tokens": 50}


@pytest.mark.parametrize(
    "body, endpoint, count",
    [
        (chat(n=4), "chat/completions", 4),
        (chat(n=0), "chat/completions", 1),  # invalid: the provider's to refuse
        (chat(n="4"), "chat/completions", 1),
        (chat(n=True), "chat/completions", 1),
        (chat(n=10**9), "chat/completions", MAX_COMPLETIONS),
        ({**TEXT, "n": 2}, "completions", 2),
        ({**TEXT, "n": 2, "best_of": 5}, "completions", 5),
        ({**TEXT, "prompt": ["Hi", "Yo", "Hey"], "n": 2}, "completions", 6),
        ({**TEXT, "prompt": [[1, 2], [3]], "best_of": 3}, "completions", 6),
        ({**TEXT, "prompt": [1, 2, 3], "n": 2}, "completions", 2),  # token ids: one prompt
        ({"model": "gpt-4o-mini", "input": "Hi", "n": 4}, "responses", 1),
        ({"model": "text-embedding-3-small", "input": ["a", "b"], "n": 4}, "embeddings", 1),
    ],
)
def test_completions_requested(body, endpoint, count):
    assert completions_requested(body, endpoint) == count


@pytest.mark.parametrize(
    "body, path, count",
    [
        (chat(max_tokens=50, n=4), "/p/chat/completions", 4),
        ({**TEXT, "prompt": ["Hi", "Yo"], "best_of": 2}, "/p/completions", 4),
    ],
)
async def test_every_completion_is_reserved_and_shares_the_lowered_max_tokens(
    make_gate, body, path, count
):
    _, addons, _ = make_gate(count=1000)
    roomy = await sent_upstream(addons, body, path)
    reserved = notes.of(roomy)["reserved"]["completion_tokens"]
    assert reserved == 50 * count and json.loads(roomy.request.content)["max_tokens"] == 50
    _, addons, _ = make_gate(count=100)
    tight = await sent_upstream(addons, body, path)
    state = notes.of(tight)
    left = 100 - state["reserved"]["prompt_tokens"]
    assert state["reserved"]["completion_tokens"] == left
    assert json.loads(tight.request.content)["max_tokens"] == left // count
    assert state["max_tokens_lowered_to"] == left // count and state["max_tokens_requested"] == 50


async def test_burst_asking_for_several_choices_stays_within_the_limit(make_gate):
    gate, addons, _ = make_gate(count=1000)
    flows = [reverse_flow(body=chat(max_tokens=50, n=4)) for _ in range(16)]
    await asyncio.gather(*(through(addons, ("requestheaders", "request"), f) for f in flows))
    admitted = [f for f in flows if f.response is None]
    assert 0 < len(admitted) < len(flows)
    for flow in admitted:  # each choice as long as it may be: what the provider bills at most
        await settle(addons, flow, completion=4 * json.loads(flow.request.content)["max_tokens"])
    await gate.writes.caught_up()  # the settlements handed over
    (status,) = await gate.store.status(buckets_for(gate.proxy("p"), "alice"))
    assert status.reserved == 0 and status.used <= 1000


def sse_head():
    response = tutils.tresp(content=None)
    response.headers["content-type"] = "text/event-stream"
    return response


def sse_response(*payloads) -> bytes:
    return b"".join(
        f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n".encode() for p in payloads
    )


async def test_stream_hides_the_injected_usage_chunk_and_adds_the_trailer(make_gate):
    gate, addons, _ = make_gate()
    flow = await sent_upstream(addons, chat(stream=True, max_tokens=50))
    flow.response = sse_head()
    await through(addons, ("responseheaders",), flow)
    # Headers leave with the reservation held: 1000 - (9 + 50).
    assert flow.response.headers["X-RateLimit-Remaining"] == "941"
    upstream = sse_response(
        {"choices": [{"index": 0, "delta": {"content": "Hi"}}], "usage": None},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1}},
        "[DONE]",
    )
    pieces = [upstream[i : i + 5] for i in range(0, len(upstream), 5)] + [b""]
    received = b"".join(b"".join(flow.response.stream(piece)) for piece in pieces)
    assert b'"choices": []' not in received
    assert received.endswith(
        b": x-ratelimit-remaining-tokens=990 x-tokens-consumed=10\n\ndata: [DONE]\n\n"
    )
    await through(addons, ("response",), flow)
    await gate.writes.caught_up()  # the settlements handed over
    (status,) = await gate.store.status(buckets_for(gate.proxy("p"), "alice"))
    assert (status.used, status.reserved) == (10, 0)
    assert notes.of(flow)["usage"]["source"] == "reported"


@pytest.mark.parametrize("how", ["provider-cut", "client-gone"])
async def test_stream_ended_early_is_charged_its_text_once(make_gate, how):
    gate, addons, metering = make_gate()
    flow = await sent_upstream(addons, chat(stream=True, max_tokens=50))
    flow.response = sse_head()
    await through(addons, ("responseheaders",), flow)
    flow.response.stream(
        sse_response({"choices": [{"index": 0, "delta": {"content": "Hello there"}}]})
    )
    flow.error = tflow.terr("Client disconnected." if how == "client-gone" else "peer closed")
    await through(addons, ("error",), flow)
    metering.error(flow)  # a second report changes nothing
    metering.response(flow)
    await gate.writes.caught_up()  # the settlements handed over
    (status,) = await gate.store.status(buckets_for(gate.proxy("p"), "alice"))
    assert (status.used, status.reserved) == (HELLO_PROMPT + 2, 0)  # "Hello there": 2 tokens
    assert notes.of(flow)["usage"]["source"] == "estimated"


QUEUED = "    queue_wait: 5s\n"


async def settle(addons, flow, completion: int) -> None:
    usage = {"prompt_tokens": HELLO_PROMPT, "completion_tokens": completion}
    flow.response = tutils.tresp(content=json.dumps({"usage": usage}).encode())
    await through(addons, ("responseheaders", "response"), flow)


async def queued(metering: Metering, task: asyncio.Task) -> None:
    """Wait (bounded) until the request of `task` waits in the queue; the store may answer
    from a worker thread, so this polls instead of yielding a fixed number of times."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not metering.quota.waiting and not task.done() and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert metering.quota.waiting == 1 and not task.done()


async def test_queue_admits_once_the_reservation_in_the_way_settles(make_gate):
    _, addons, metering = make_gate(count=100, extra=QUEUED)
    first = await sent_upstream(addons, chat(max_tokens=91))  # holds all 100
    second = reverse_flow(body=chat(max_tokens=10))
    waiting = asyncio.create_task(through(addons, ("requestheaders", "request"), second))
    await queued(metering, waiting)
    await settle(addons, first, completion=5)  # 14 spent: room again, and the waiter is woken
    await asyncio.wait_for(waiting, 2)
    assert second.response is None  # admitted, on its way upstream
    assert metering.quota.waiting == 0


async def test_queue_is_bounded_and_spent_budget_is_not_waited_for(make_gate):
    _, addons, metering = make_gate(count=100, extra=QUEUED, tokengate_queue_limit=0)
    await sent_upstream(addons, chat(max_tokens=91))
    refused = reverse_flow(body=chat(max_tokens=10))
    await asyncio.wait_for(through(addons, ("requestheaders", "request"), refused), 1)
    assert refused.response.status_code == 429  # the queue is full (limit 0): at once
    _, addons, metering = make_gate(count=100, extra=QUEUED)
    spent = await sent_upstream(addons, chat(max_tokens=91))
    await settle(addons, spent, completion=91)
    refused = reverse_flow(body=chat(max_tokens=10))
    await asyncio.wait_for(through(addons, ("requestheaders", "request"), refused), 1)
    assert refused.response.status_code == 429  # spent, not reserved: no wait helps
    assert metering.quota.waiting == 0


async def test_caller_hanging_up_while_queued_leaves_nothing_behind(make_gate):
    gate, addons, metering = make_gate(count=100, extra=QUEUED)
    await sent_upstream(addons, chat(max_tokens=91))
    gone = reverse_flow(body=chat(max_tokens=10))
    waiting = asyncio.create_task(through(addons, ("requestheaders", "request"), gone))
    await queued(metering, waiting)
    gone.client_conn.state = ConnectionState.CLOSED
    await asyncio.wait_for(waiting, 2)  # within a poll interval, long before queue_wait
    assert gone.response.status_code == 429 and metering.quota.waiting == 0
    await gate.writes.caught_up()  # the settlements handed over
    (status,) = await gate.store.status(buckets_for(gate.proxy("p"), "alice"))
    assert status.reserved == 100  # only the first request's reservation


async def test_caller_gone_as_the_queue_admits_it_holds_nothing(make_gate, monkeypatch):
    gate, addons, metering = make_gate(count=100, extra=QUEUED)
    first = await sent_upstream(addons, chat(max_tokens=91))
    gone = reverse_flow(body=chat(max_tokens=10))
    reserve = gate.store.reserve

    async def hang_up_once_admitted(reservation_id, buckets, demand):
        decision, reservation = await reserve(reservation_id, buckets, demand)
        if reservation is not None and reservation_id == gone.id:
            gone.client_conn.state = ConnectionState.CLOSED
        return decision, reservation

    monkeypatch.setattr(gate.store, "reserve", hang_up_once_admitted)
    waiting = asyncio.create_task(through(addons, ("requestheaders", "request"), gone))
    await queued(metering, waiting)
    await settle(addons, first, completion=5)  # room again: the waiter is admitted, but gone
    await asyncio.wait_for(waiting, 2)
    assert gone.response.status_code == 429  # the last refusal; nobody is there to read it
    assert metering.quota.waiting == 0
    await gate.writes.caught_up()  # the settlements handed over
    (status,) = await gate.store.status(buckets_for(gate.proxy("p"), "alice"))
    assert (status.used, status.reserved) == (HELLO_PROMPT + 5, 0)


async def test_queue_wait_runs_out_into_a_truthful_429(make_gate):
    _, addons, _ = make_gate(count=100, extra="    queue_wait: 1s\n")
    await sent_upstream(addons, chat(max_tokens=91))
    late = reverse_flow(body=chat(max_tokens=10))
    await asyncio.wait_for(through(addons, ("requestheaders", "request"), late), 3)
    assert late.response.status_code == 429
    # The first reservation is still held: retry once its charge leaves the 1m window.
    assert 58 <= int(late.response.headers["Retry-After"]) <= 60
