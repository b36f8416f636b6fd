"""End to end: streamed answers pass through, and are charged exactly once for what they cost."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from tokengate_core import tokens

from tests.support.calls import HELLO, call
from tests.support.calls import charged_so_far as charged_before_probe
from tests.support.processes import Gateway, wait_until, write_quotas
from tests.support.quotas import ALICE, BOB, key_entries, proxy_yaml

BUDGET = 100_000
HELLO_PROMPT = 9  # what OpenAI (and the mock) bill for HELLO's prompt
CAROL = "tg-carol-secret-key"


@pytest.fixture
def gateway(tmp_path, fresh_mock):
    config = write_quotas(tmp_path / "quotas.yaml", fresh_mock.url, proxy_yaml(count=BUDGET))
    started = Gateway.start(config, f"reverse:{fresh_mock.url}")
    yield started
    started.stop()


def charged_so_far(gateway: Gateway) -> int:
    return charged_before_probe(gateway, BUDGET)


def streamed_text(payload: bytes) -> str:
    text = []
    for line in payload.decode().splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices", []):
                text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text)


def stream(gateway: Gateway, body: dict, mode: str = "normal", **headers) -> httpx.Response:
    return httpx.stream(
        "POST",
        f"{gateway.url}/rate-limited-proxy/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {ALICE}", "X-Mock-Mode": mode, **headers},
        timeout=30,
    )


def test_sdk_stream_with_usage_is_charged_what_the_provider_reported(gateway):
    client = openai.OpenAI(
        base_url=f"{gateway.url}/rate-limited-proxy", api_key=ALICE, max_retries=0
    )
    chunks = list(
        client.chat.completions.create(
            **HELLO, max_tokens=30, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert tokens.count_text(text, "gpt-4o-mini") == 30
    assert chunks[-1].usage.total_tokens == HELLO_PROMPT + 30
    assert charged_so_far(gateway) == HELLO_PROMPT + 30


def test_responses_api_stream_is_charged_from_response_completed(gateway):
    client = openai.OpenAI(
        base_url=f"{gateway.url}/rate-limited-proxy", api_key=ALICE, max_retries=0
    )
    events = list(
        client.responses.create(model="gpt-4o-mini", input="Hi", max_output_tokens=25, stream=True)
    )
    completed = [e for e in events if e.type == "response.completed"]
    assert completed and completed[0].response.usage.output_tokens == 25
    assert charged_so_far(gateway) == completed[0].response.usage.total_tokens


def test_stream_cut_by_provider_is_charged_what_was_streamed(gateway):
    with stream(gateway, {**HELLO, "stream": True, "max_tokens": 80}, "cut") as answer:
        received = bytearray()
        with pytest.raises(httpx.HTTPError):
            for chunk in answer.iter_bytes():
                received += chunk
    text = streamed_text(bytes(received))
    assert text  # some of it arrived before the cut
    expected = HELLO_PROMPT + tokens.count_text(text, "gpt-4o-mini")
    assert expected < HELLO_PROMPT + 80  # neither the reservation ...
    assert charged_so_far(gateway) == expected  # ... nor 0: what was streamed


def test_client_disconnect_mid_stream_is_charged_once_and_leaks_nothing(gateway):
    body = {**HELLO, "stream": True, "max_tokens": 80}
    with stream(gateway, body, "slow", **{"X-Mock-Delay": "0.3"}) as answer:
        received = bytearray()
        for chunk in answer.iter_bytes():  # leave once some text arrived, mid-generation
            received += chunk
            if streamed_text(bytes(received)):
                break
    seen = HELLO_PROMPT + tokens.count_text(streamed_text(bytes(received)), "gpt-4o-mini")
    # The gate settles when mitmproxy reports the disconnect; each probe adds its own cost.
    probe_cost = HELLO_PROMPT + 1
    deadline = time.monotonic() + 10
    probes = 0
    while True:
        charged = charged_so_far(gateway) - probes * probe_cost
        probes += 1
        if charged < HELLO_PROMPT + 80 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # Charged for what streamed before the disconnect: more than nothing, less than the reserve.
    assert seen <= charged < HELLO_PROMPT + 80


def test_streamed_json_body_is_still_metered(tmp_path, fresh_mock):
    config = write_quotas(tmp_path / "quotas.yaml", fresh_mock.url, proxy_yaml(count=BUDGET))
    gateway = Gateway.start(config, f"reverse:{fresh_mock.url}", "--set", "stream_large_bodies=1")
    try:
        answer = call(gateway, ALICE, body={**HELLO, "max_tokens": 40})
        assert answer.status_code == 200
        assert answer.json()["usage"]["total_tokens"] == HELLO_PROMPT + 40
        # Both bodies streamed: the gate decided at the request's headers (prompt unknown, the
        # proxy's completion_reserve held) and its headers show that reservation.
        reserve = 256
        assert int(answer.headers["X-RateLimit-Remaining"]) == BUDGET - reserve
        probe = call(gateway, ALICE, body={**HELLO, "max_tokens": 1})
        # ... while the books settled the first call at what the provider reported.
        assert int(probe.headers["X-RateLimit-Remaining"]) == BUDGET - (HELLO_PROMPT + 40) - reserve
    finally:
        gateway.stop()


def test_oversized_body_is_refused_before_tokenizing(tmp_path, fresh_mock):
    config = write_quotas(tmp_path / "quotas.yaml", fresh_mock.url, proxy_yaml(count=BUDGET))
    gateway = Gateway.start(config, f"reverse:{fresh_mock.url}", "--set", "tokengate_max_body=2k")
    try:
        big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x " * 5000}]}
        answer = call(gateway, ALICE, body=big)
        assert answer.status_code == 413
        assert answer.headers["X-TokenGate-Source"] == "gateway"
        assert answer.json()["error"]["code"] == "request_too_large"
        assert call(gateway, ALICE).status_code == 200
        assert fresh_mock.stats()["requests"] == 1
    finally:
        gateway.stop()


def test_upstream_invalid_json_is_charged_the_prompt_estimate(gateway):
    answer = call(gateway, ALICE, **{"X-Mock-Mode": "invalid-json"})
    assert answer.status_code == 200
    assert answer.headers["X-Tokens-Consumed"] == str(HELLO_PROMPT)
    assert charged_so_far(gateway) == HELLO_PROMPT


def test_caller_hanging_up_before_the_answer_keeps_the_reservation(gateway):
    body = {**HELLO, "max_tokens": 30}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            f"{gateway.url}/rate-limited-proxy/chat/completions",
            json=body,
            headers={
                "Authorization": f"Bearer {ALICE}",
                "X-Mock-Mode": "slow",
                "X-Mock-Delay": "5",
            },
            # Longer than the first request's wait for the tokenizer, which is still being
            # built at start: the request must reach the provider before the caller hangs up.
            timeout=2,
        )
    # Wait for the gate to settle the hang-up (until then the reservation would show the same).
    settled = f"charged {HELLO_PROMPT + 30} tokens"
    assert wait_until(lambda: settled in gateway.process.output, timeout=10)
    # The provider was already working on it: the reservation (9 + 30) is charged, not released.
    assert charged_so_far(gateway) == HELLO_PROMPT + 30


def sse_events(payload: bytes) -> tuple[list[str], list[str]]:
    """The data of every event, and every comment line, as an SSE client would read them."""
    data, comments = [], []
    for block in payload.decode().replace("\r\n", "\n").split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                data.append(line[6:])
            elif line.startswith(":") and line != ": keep-alive":
                comments.append(line)
    return data, comments


def test_sdk_streams_without_include_usage_see_no_usage_chunk(gateway, fresh_mock):
    client = openai.OpenAI(
        base_url=f"{gateway.url}/rate-limited-proxy", api_key=ALICE, max_retries=0
    )
    chunks = list(client.chat.completions.create(**HELLO, max_tokens=30, stream=True))
    assert chunks and all(chunk.choices for chunk in chunks)  # `choices[0]` never fails
    assert all(chunk.usage is None for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert tokens.count_text(text, "gpt-4o-mini") == 30
    # The gate asked the provider for usage, and settled on it, not on its own count.
    upstream = fresh_mock.stats()["last_request"]["body"]
    assert upstream["stream_options"] == {"include_usage": True}
    assert charged_so_far(gateway) == HELLO_PROMPT + 30


async def test_async_sdk_stream_with_include_usage_gets_it(gateway):
    client = openai.AsyncOpenAI(
        base_url=f"{gateway.url}/rate-limited-proxy", api_key=ALICE, max_retries=0
    )
    created = await client.chat.completions.create(
        **HELLO, max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in created]
    await client.close()
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == HELLO_PROMPT + 12
    assert charged_so_far(gateway) == HELLO_PROMPT + 12


async def test_async_sdk_stream_without_include_usage(gateway):
    client = openai.AsyncOpenAI(
        base_url=f"{gateway.url}/rate-limited-proxy", api_key=ALICE, max_retries=0
    )
    created = await client.chat.completions.create(**HELLO, max_tokens=7, stream=True)
    chunks = [chunk async for chunk in created]
    await client.close()
    assert all(chunk.choices and chunk.usage is None for chunk in chunks)
    assert charged_so_far(gateway) == HELLO_PROMPT + 7


def test_events_split_at_random_offsets_arrive_whole_with_one_trailer(gateway):
    body = {**HELLO, "stream": True, "max_tokens": 25}
    cost = HELLO_PROMPT + 25
    seeds = range(4)
    for seed in seeds:
        with stream(gateway, body, "split", **{"X-Mock-Seed": str(seed)}) as answer:
            assert int(answer.headers["X-RateLimit-Remaining"]) == BUDGET - (seed + 1) * cost
            received = b"".join(answer.iter_bytes())
        data, comments = sse_events(received)
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert all(chunk["choices"] for chunk in chunks)  # the usage-only chunk was removed
        assert tokens.count_text(streamed_text(received), "gpt-4o-mini") == 25
        # One trailer, right before [DONE]: the budget after this call, and what it cost.
        assert comments == [
            f": x-ratelimit-remaining-tokens={BUDGET - (seed + 1) * cost} x-tokens-consumed={cost}"
        ]
        assert received.replace(b"\r\n", b"\n").endswith(
            f"{comments[0]}\n\ndata: [DONE]\n\n".encode()
        )
    assert charged_so_far(gateway) == len(seeds) * cost


def test_first_bytes_reach_the_caller_while_the_provider_is_still_sending(gateway, fresh_mock):
    body = {**HELLO, "stream": True, "max_tokens": 16}
    with stream(gateway, body, "slow", **{"X-Mock-Delay": "0.1"}) as answer:
        chunks = answer.iter_bytes()
        first = next(chunks)
        # The mock counts tokens served only once its last event is written.
        still_sending = fresh_mock.stats()["tokens_served"]["total"] == 0
        rest = b"".join(chunks)
    assert first and still_sending
    assert wait_until(lambda: fresh_mock.stats()["tokens_served"]["total"] == HELLO_PROMPT + 16)
    assert tokens.count_text(streamed_text(first + rest), "gpt-4o-mini") == 16


def test_streamed_completions_endpoint_hides_the_usage_chunk_too(gateway):
    body = {"model": "gpt-4o-mini", "prompt": "Hello!", "max_tokens": 9, "stream": True}
    with httpx.stream(
        "POST",
        f"{gateway.url}/rate-limited-proxy/completions",
        json=body,
        headers={"Authorization": f"Bearer {ALICE}"},
        timeout=30,
    ) as answer:
        data, comments = sse_events(b"".join(answer.iter_bytes()))
    assert data[-1] == "[DONE]" and all(json.loads(d)["choices"] for d in data[:-1])
    assert len(comments) == 1 and comments[0].startswith(": x-ratelimit-remaining-tokens=")


def test_queue_wait_admits_a_burst_that_would_otherwise_get_429(tmp_path, fresh_mock):
    count = 200  # a request without max_tokens reserves all of it; the mock then uses 9 + 120
    queued = proxy_yaml(count=count, extra="    queue_wait: 10s\n")
    plain = queued.split("    keys:\n")[0].replace("rate-limited-proxy", "plain")
    plain = plain.replace("    queue_wait: 10s\n", "") + "    keys:\n" + key_entries(carol=CAROL)
    config = write_quotas(tmp_path / "quotas.yaml", fresh_mock.url, queued + plain)
    gateway = Gateway.start(config, f"reverse:{fresh_mock.url}")
    try:
        for context, key, expected in (("plain", CAROL, 429), ("rate-limited-proxy", ALICE, 200)):
            fresh_mock.reset()
            with ThreadPoolExecutor(1) as pool:
                slow = pool.submit(
                    httpx.post,
                    f"{gateway.url}/{context}/chat/completions",
                    json=HELLO,
                    headers={
                        "Authorization": f"Bearer {key}",
                        "X-Mock-Mode": "slow",
                        "X-Mock-Delay": "0.5",
                    },
                    timeout=30,
                )
                assert wait_until(lambda: fresh_mock.stats()["requests"] == 1, timeout=10)
                burst = httpx.post(
                    f"{gateway.url}/{context}/chat/completions",
                    json={**HELLO, "max_tokens": 10},
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=30,
                )
                assert slow.result().status_code == 200
            assert burst.status_code == expected, (context, burst.text)
        # Admitted once the first settled at 129 of its 200 reserved: 200 - 129 - 19 left.
        assert int(burst.headers["X-RateLimit-Remaining"]) == count - (HELLO_PROMPT + 120) - 19

        # A caller that hangs up while queued is not sent upstream later, and holds nothing.
        fresh_mock.reset()
        queued_url = f"{gateway.url}/rate-limited-proxy/chat/completions"
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(
                httpx.post,
                queued_url,
                json=HELLO,
                headers={"Authorization": f"Bearer {BOB}", "X-Mock-Mode": "slow"},
                timeout=30,
            )
            assert wait_until(lambda: fresh_mock.stats()["requests"] == 1, timeout=10)
            with pytest.raises(httpx.TimeoutException):
                httpx.post(
                    queued_url,
                    json={**HELLO, "max_tokens": 10},
                    headers={"Authorization": f"Bearer {BOB}"},
                    timeout=0.3,
                )
            assert slow.result().status_code == 200
        probe = call(gateway, BOB, body={**HELLO, "max_tokens": 1})
        assert fresh_mock.stats()["requests"] == 2  # the slow one and the probe
        assert int(probe.headers["X-RateLimit-Remaining"]) == count - (HELLO_PROMPT + 120) - 10
    finally:
        gateway.stop()
