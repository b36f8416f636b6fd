"""The mock provider, run as a real process and driven with httpx and the official openai SDK.

The end-to-end tests trust its usage numbers and its misbehaviour modes, so those are pinned here.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from tokengate_core import tokens
from tokengate_core.dialects.openai import estimate_prompt
from tokengate_core.tools import mock
from tokengate_core.tools.children import MOCK

from tests.support.processes import self_signed

KEY = "sk-provider"
AUTH = {"Authorization": f"Bearer {KEY}"}


READY = "mock-openai listening at "


@pytest.fixture(scope="module")
def base_url():
    proc = subprocess.Popen(
        [*MOCK, "--expect-key", KEY],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith(READY), line
        yield line.strip().removeprefix(READY)
    finally:
        proc.terminate()
        returncode = proc.wait(timeout=5)
    assert returncode == 0  # SIGTERM is a clean exit


@pytest.fixture
def http(base_url):
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=5) as client:
        client.post("/mock/reset")
        yield client


@pytest.fixture
def sdk(base_url):
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0) as client:
        yield client


CHAT = {
    "model": "gpt-4o",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say something long.", "name": "alice"},
    ],
}


def sse_events(payload: str) -> list[dict]:
    """Parsed data of each SSE event, minus per-response ids and timestamps."""
    events = []
    for block in payload.replace("\r\n", "\n").split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        data = "".join(line.removeprefix("data: ") for line in lines if line.startswith("data:"))
        if data:
            event = {"raw": data} if data == "[DONE]" else json.loads(data)
            event.pop("id", None)
            event.pop("created", None)
            events.append(event)
    return events


def test_chat_usage_is_the_gateway_estimate(sdk):
    reply = sdk.chat.completions.create(**CHAT, max_tokens=17)
    assert reply.usage.prompt_tokens == estimate_prompt("chat/completions", CHAT)
    assert reply.usage.completion_tokens == 17
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 17
    assert tokens.count_text(reply.choices[0].message.content, "gpt-4o") == 17
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize("n", [0, 1, 7, 300])
def test_max_completion_tokens_with_another_encoding(sdk, n):
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}
    reply = sdk.chat.completions.create(**body, max_completion_tokens=n)
    assert reply.usage.completion_tokens == n
    assert tokens.count_text(reply.choices[0].message.content, "gpt-4") == n


def test_completions_default_length_without_v1_prefix(http):
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": ["one", "two three"]}
    reply = http.post("/completions", json=body).json()
    assert reply["object"] == "text_completion"
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["prompt_tokens"] == estimate_prompt("completions", body)
    assert reply["usage"]["completion_tokens"] == 120
    assert tokens.count_text(reply["choices"][0]["text"], body["model"]) == 120


def test_chat_stream_with_usage_chunk(sdk):
    stream = sdk.chat.completions.create(
        **CHAT, max_tokens=40, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage.prompt_tokens == estimate_prompt("chat/completions", CHAT)
    assert usage.completion_tokens == 40
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert tokens.count_text(text, "gpt-4o") == 40
    assert 5 <= len(chunks) - 3 <= 10  # content chunks


def test_chat_stream_without_include_usage_has_no_usage(http):
    with http.stream("POST", "/v1/chat/completions", json=CHAT | {"stream": True}) as r:
        assert r.headers["content-type"] == "text/event-stream"
        assert r.headers["transfer-encoding"] == "chunked"
        events = sse_events(r.read().decode())
    assert events[-1] == {"raw": "[DONE]"}
    assert all("usage" not in e for e in events[:-1])


def test_responses_stream_ends_with_completed_usage(sdk):
    body = {"model": "gpt-4o", "instructions": "Be brief.", "input": "Tell me a story."}
    events = list(sdk.responses.create(**body, max_output_tokens=9, stream=True))
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    completed = events[-1].response
    assert completed.output_text == text
    assert completed.usage.input_tokens == estimate_prompt("responses", body)
    assert completed.usage.output_tokens == 9
    assert completed.usage.total_tokens == completed.usage.input_tokens + 9


def test_responses_non_stream(sdk):
    body = {"model": "gpt-4o", "input": [{"role": "user", "content": "hello"}]}
    reply = sdk.responses.create(**body, max_output_tokens=5)
    assert reply.status == "completed"
    assert tokens.count_text(reply.output_text, "gpt-4o") == 5
    assert reply.usage.input_tokens == estimate_prompt("responses", body)


def test_embeddings_as_the_sdk_asks_for_them(sdk):
    body = {"model": "text-embedding-3-small", "input": ["alpha", "beta gamma"]}
    reply = sdk.embeddings.create(**body)  # the SDK asks for base64 and decodes it
    assert [len(d.embedding) for d in reply.data] == [8, 8]
    assert reply.usage.prompt_tokens == estimate_prompt("embeddings", body)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens
    again = sdk.embeddings.create(**body, encoding_format="float")
    assert again.data[1].embedding == pytest.approx(reply.data[1].embedding, abs=1e-6)


def test_wrong_key_is_rejected_and_counted(http, sdk):
    r = http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-caller"})
    assert r.status_code == 401
    assert r.headers["x-mock-provider"] == "1"
    assert r.json()["error"] == {
        "message": "Incorrect API key provided",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    with pytest.raises(openai.AuthenticationError):
        sdk.with_options(api_key="sk-other").chat.completions.create(**CHAT)
    stats = http.get("/mock/stats").json()
    assert stats["unauthorized"] == 2
    assert stats["authorized"] == 0
    assert stats["auth_headers_seen"] == ["Bearer sk-caller", "Bearer sk-other"]


def test_error_modes(http):
    r = http.post("/v1/chat/completions", json=CHAT, headers={"X-Mock-Mode": "error:429"})
    assert r.status_code == 429
    assert r.headers["x-ratelimit-remaining-tokens"] == "0"
    assert r.headers["retry-after"] == "7"
    assert r.headers["x-mock-provider"] == "1"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    r = http.post("/v1/embeddings", json={}, headers={"X-Mock-Mode": "error:500"})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    r = http.post("/v1/chat/completions", json=CHAT, headers={"X-Mock-Mode": "nonsense"})
    assert r.status_code == 400


def test_bad_json_body_and_invalid_json_mode(http):
    r = http.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = http.post("/v1/chat/completions", json=CHAT, headers={"X-Mock-Mode": "invalid-json"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    with pytest.raises(ValueError):
        r.json()


def test_no_usage_mode(http):
    headers = {"X-Mock-Mode": "no-usage"}
    assert "usage" not in http.post("/v1/chat/completions", json=CHAT, headers=headers).json()
    body = CHAT | {"stream": True, "stream_options": {"include_usage": True}}
    r = http.post("/v1/chat/completions", json=body, headers=headers)
    assert all("usage" not in e for e in sse_events(r.text))
    # What it would have reported (two default-length completions) still counts as served.
    assert http.get("/mock/stats").json()["tokens_served"]["completion"] == 240


def test_slow_mode_delays_the_answer(http):
    started = time.monotonic()
    r = http.post(
        "/v1/embeddings",
        json={"input": "x"},
        headers={"X-Mock-Mode": "slow", "X-Mock-Delay": "0.3"},
    )
    assert r.status_code == 200
    assert time.monotonic() - started >= 0.3


def test_cut_mode_truncates(http, sdk):
    body = CHAT | {"stream": True}
    with (
        pytest.raises(httpx.RemoteProtocolError),
        http.stream("POST", "/v1/chat/completions", json=body, headers={"X-Mock-Mode": "cut"}) as r,
    ):
        r.read()
    with pytest.raises(httpx.RemoteProtocolError):
        http.post("/v1/chat/completions", json=CHAT, headers={"X-Mock-Mode": "cut"})
    cut = sdk.with_options(default_headers={"X-Mock-Mode": "cut"})
    stream = cut.chat.completions.create(**CHAT, stream=True)
    received = []
    with pytest.raises(openai.APIConnectionError):
        received.extend(stream)
    assert received  # about half the chunks arrived before the cut
    assert http.get("/mock/stats").json()["tokens_served"]["total"] == 0


def test_split_mode_carries_the_same_events(http, sdk):
    body = CHAT | {"max_tokens": 30, "stream": True, "stream_options": {"include_usage": True}}
    normal = http.post("/v1/chat/completions", json=body).text
    split = http.post(
        "/v1/chat/completions", json=body, headers={"X-Mock-Mode": "split", "X-Mock-Seed": "3"}
    ).text
    assert "\r\n" in split and ": keep-alive" in split
    assert sse_events(split) == sse_events(normal)
    events = list(
        sdk.with_options(default_headers={"X-Mock-Mode": "split"}).responses.create(
            model="gpt-4o", input="hi", max_output_tokens=12, stream=True
        )
    )
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage.output_tokens == 12


def test_stats_and_reset(http):
    http.post("/v1/chat/completions", json=CHAT | {"max_tokens": 4})
    http.post("/v1/embeddings", json={"input": "x"}, headers={"x-api-key": "sk-leak"})
    http.post("/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer no"})
    http.get("/v1/models")
    stats = http.get("/mock/stats").json()
    # Served: the chat and the one authorized embedding.
    prompt = estimate_prompt("chat/completions", CHAT) + tokens.count_text("x", None)
    assert stats == {
        "requests": 4,
        "by_endpoint": {"chat/completions": 1, "embeddings": 2, "/v1/models": 1},
        "authorized": 3,
        "unauthorized": 1,
        "auth_headers_seen": [f"Bearer {KEY}", "Bearer no"],
        "other_headers_seen": {"x-api-key": 1, "api-key": 0},
        "tokens_served": {"prompt": prompt, "completion": 4, "total": prompt + 4},
        "delivered_by_tag": {"-": prompt + 4},
        "last_request": stats["last_request"],
    }
    assert stats["last_request"]["path"] == "/v1/models"
    assert stats["last_request"]["body"] is None
    headers = {k.lower(): v for k, v in stats["last_request"]["headers"].items()}
    assert headers["authorization"] == f"Bearer {KEY}"
    assert http.post("/mock/reset").status_code == 200
    stats = http.get("/mock/stats").json()
    assert stats["requests"] == 0
    assert stats["tokens_served"] == {"prompt": 0, "completion": 0, "total": 0}
    assert stats["last_request"] is None


def test_in_process_with_tls(tmp_path):
    pem = self_signed(tmp_path)  # certificate and key in one file
    server, thread = mock.serve(tls_cert=str(pem), quiet=True)
    try:
        assert server.url.startswith("https://127.0.0.1:")
        with httpx.Client(verify=False) as client:
            reply = client.post(f"{server.url}/v1/embeddings", json={"input": "x"}).json()
            assert reply["usage"]["prompt_tokens"] == 1
            assert client.get(f"{server.url}/mock/stats").json()["requests"] == 1
    finally:
        server.shutdown()
        server.server_close()
    thread.join(timeout=1)
    assert not thread.is_alive()


def test_429_carries_the_providers_own_rate_limit_headers(http):
    r = http.post("/v1/chat/completions", json=CHAT, headers={"X-Mock-Mode": "error:429"})
    assert r.status_code == 429
    assert r.headers["x-ratelimit-limit-tokens"] == "30000"
    assert r.headers["x-ratelimit-reset-tokens"] == "7s"
    assert r.headers["retry-after-ms"] == "7000"


def test_reset_modes_abort_with_rst(http):
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        http.post("/v1/chat/completions", json=CHAT, headers={"X-Mock-Mode": "reset"})
    tagged = {"X-Mock-Mode": "reset-mid", "X-Mock-Tag": "t"}
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        http.post("/v1/chat/completions", json=CHAT, headers=tagged)
    received = bytearray()
    body = CHAT | {"stream": True, "max_tokens": 16}
    with (
        pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)),
        http.stream("POST", "/v1/chat/completions", json=body, headers=tagged) as r,
    ):
        for chunk in r.iter_bytes():
            received += chunk
    events = sse_events(received.decode())
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    stats = http.get("/mock/stats").json()
    assert stats["tokens_served"]["total"] == 0  # no answer was completed
    # What did leave in the cut stream: the prompt and the text before the reset.
    prompt = estimate_prompt("chat/completions", body)
    assert text and stats["delivered_by_tag"] == {"t": prompt + tokens.count_text(text, "gpt-4o")}


def test_hang_mode_never_answers(http):
    with pytest.raises(httpx.ReadTimeout):
        http.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={"X-Mock-Mode": "hang", "X-Mock-Delay": "5"},
            timeout=0.3,
        )
    assert http.get("/mock/stats").json()["tokens_served"]["total"] == 0


def test_drip_mode_carries_the_same_answer_byte_by_byte(http):
    body = CHAT | {"max_tokens": 8}
    normal = http.post("/v1/chat/completions", json=body).json()
    drip = http.post("/v1/chat/completions", json=body, headers={"X-Mock-Mode": "drip"}).json()
    assert drip["usage"] == normal["usage"]
    assert drip["choices"] == normal["choices"]
    stream = body | {"stream": True, "stream_options": {"include_usage": True}}
    normal = sse_events(http.post("/v1/chat/completions", json=stream).text)
    with http.stream(
        "POST", "/v1/chat/completions", json=stream, headers={"X-Mock-Mode": "drip"}
    ) as r:
        pieces = list(r.iter_raw())
    assert len(pieces) > 20  # arrived in many small reads
    assert sse_events(b"".join(pieces).decode()) == normal


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("usage-negative", lambda n: -(n + 1)),
        ("usage-absurd", lambda n: 10**15),
        ("usage-float", lambda n: n + 0.5),
        ("usage-string", str),
    ],
)
def test_usage_fault_modes(http, mode, expected):
    prompt = estimate_prompt("chat/completions", CHAT)
    reply = http.post(
        "/v1/chat/completions", json=CHAT | {"max_tokens": 5}, headers={"X-Mock-Mode": mode}
    ).json()
    assert reply["usage"]["prompt_tokens"] == expected(prompt)
    assert reply["usage"]["completion_tokens"] == expected(5)
    assert tokens.count_text(reply["choices"][0]["message"]["content"], "gpt-4o") == 5
    stream = http.post(
        "/v1/responses",
        json={"model": "gpt-4o", "input": "hi", "max_output_tokens": 3, "stream": True},
        headers={"X-Mock-Mode": mode},
    ).text
    usage = sse_events(stream)[-1]["response"]["usage"]
    assert usage["output_tokens"] == expected(3)
    served = http.get("/mock/stats").json()["tokens_served"]
    assert served["completion"] == 5 + 3  # what it generated, whatever it reported


def test_record_file_keeps_every_request(tmp_path):
    record = tmp_path / "received.jsonl"
    server, thread = mock.serve(quiet=True, record=str(record))
    try:
        with httpx.Client(base_url=server.url) as client:
            client.post("/v1/embeddings", json={"input": "x"}, headers={"X-Api-Key": "k1"})
            client.get("/v1/models?limit=2")
            client.get("/mock/stats")  # the mock's own endpoints are not provider traffic
    finally:
        server.shutdown()
        server.server_close()
    thread.join(timeout=1)
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(line["method"], line["target"]) for line in lines] == [
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/models?limit=2"),
    ]
    assert ["X-Api-Key", "k1"] in lines[0]["headers"]
    assert json.loads(lines[0]["body"]) == {"input": "x"}


def test_max_tokens_above_the_models_maximum_is_refused(http):
    r = http.post("/v1/chat/completions", json=CHAT | {"max_tokens": 10**20})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_value"
    assert http.get("/mock/stats").json()["tokens_served"]["total"] == 0


def test_models_are_listed_and_retrieved_as_the_sdk_reads_them(sdk, http):
    listed = [model.id for model in sdk.models.list()]
    assert "gpt-4o-mini" in listed and len(listed) == len(set(listed))
    model = sdk.models.retrieve("gpt-4o")
    assert (model.id, model.object, model.owned_by) == ("gpt-4o", "model", "mock")
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.models.retrieve("no-such-model")
    assert missing.value.code == "model_not_found"
    assert http.get("/models").json()["object"] == "list"  # without /v1 too, like the rest
    assert http.get("/v1/models", headers={"Authorization": "Bearer no"}).status_code == 401


def test_a_busy_port_is_named_with_how_to_choose_another(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        shim = Path(__file__).resolve().parents[2] / "scripts" / "mock_openai.py"
        run = subprocess.run(
            [sys.executable, str(shim), "--port", str(port)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert f"port {port} on 127.0.0.1 is busy" in run.stderr and "--port PORT" in run.stderr


def test_prompt_rules_count_prompts_otherwise(http):
    body = {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "x" * 90}]}
    exact = estimate_prompt("chat/completions", body, 10**6)

    def prompt_tokens(rule: str) -> int:
        answer = http.post("/v1/chat/completions", json=body, headers={"X-Mock-Prompt-Rule": rule})
        assert answer.status_code == 200, answer.text
        return answer.json()["usage"]["prompt_tokens"]

    assert prompt_tokens("exact") == exact
    assert prompt_tokens("scale:1.1") == -(-exact * 11 // 10)  # rounded up
    assert prompt_tokens("scale:0.9") == -(-exact * 9 // 10)
    assert prompt_tokens("chars:3") == (len("user") + 90 + 2) // 3  # 94 characters of text
    refused = http.post("/v1/chat/completions", json=body, headers={"X-Mock-Prompt-Rule": "x:1"})
    assert refused.status_code == 400 and "X-Mock-Prompt-Rule" in refused.text
    with pytest.raises(SystemExit):
        mock.parse_args(["--prompt-rule", "scale:0"])
