"""End to end: a real mitmdump with TokenGate in front of the real mock provider process."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import os
import re
import subprocess
import time

import httpx
import openai
import pytest
from mitmproxy import io

from tests.support.calls import HELLO, call, charged_so_far
from tests.support.processes import (
    MITMDUMP,
    PROVIDER_KEY,
    ROOT,
    Gateway,
    credentials_in,
    wait_until,
    write_quotas,
)
from tests.support.quotas import ALICE, BOB, proxy_yaml

SOURCE = "X-TokenGate-Source"


def test_reference_walkthrough(gateway_factory, fresh_mock):
    gateway = gateway_factory()
    first = call(gateway, ALICE)
    assert first.status_code == 200, first.text
    assert "X-RateLimit-Remaining" in first.headers
    usage = first.json()["usage"]
    assert first.headers["X-Tokens-Consumed"] == str(usage["total_tokens"])
    assert int(first.headers["X-RateLimit-Remaining"]) == max(0, 100 - usage["total_tokens"])
    assert first.headers["x-ratelimit-limit-tokens"] == "100"
    assert "RateLimit-Policy" in first.headers and "RateLimit" in first.headers
    assert "X-TokenGate-Source" not in first.headers  # the provider's answer

    second = call(gateway, ALICE)
    assert second.status_code == 429
    assert second.headers["X-TokenGate-Source"] == "gateway"
    reset = int(second.headers["X-RateLimit-Reset"])
    assert time.time() < reset <= time.time() + 61  # epoch seconds, within the window
    assert second.headers["X-RateLimit-Quota"] == "total_tokens-1m"
    assert 0 < int(second.headers["Retry-After"]) <= 60
    error = second.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "tokens"
    assert "limit 100" in error["message"]

    unauthenticated = call(gateway, None)
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["error"]["code"] == "invalid_api_key"
    assert unauthenticated.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = call(gateway, "tg-not-a-key")
    assert wrong.status_code == 401

    stats = fresh_mock.stats()
    assert stats["requests"] == 1  # only the admitted call reached the provider
    assert stats["unauthorized"] == 0
    assert stats["auth_headers_seen"] == [f"Bearer {PROVIDER_KEY}"]
    assert stats["other_headers_seen"]["x-api-key"] == 0


def test_key_scope_and_x_api_key_header(gateway_factory, fresh_mock):
    gateway = gateway_factory()
    assert call(gateway, ALICE).status_code == 200
    assert call(gateway, ALICE).status_code == 429
    # bob has his own budget, and may send his key as X-API-Key (Azure's `api-key` form beside it)
    by_header = httpx.post(
        f"{gateway.url}/rate-limited-proxy/chat/completions",
        json=HELLO,
        headers={"X-API-Key": BOB, "api-key": BOB},
        timeout=30,
    )
    assert by_header.status_code == 200
    assert fresh_mock.stats()["requests"] == 2  # alice's first call, then bob's: the last one
    seen = fresh_mock.last_request_headers()
    assert seen["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert credentials_in(seen) == ["authorization"]
    assert fresh_mock.stats()["other_headers_seen"] == {"x-api-key": 0, "api-key": 0}


def test_proxy_scope_is_shared(gateway_factory):
    gateway = gateway_factory(proxy_yaml(scope="proxy"))
    assert call(gateway, ALICE).status_code == 200
    assert call(gateway, BOB).status_code == 429


def test_g4_waiting_until_reset_is_enough(gateway_factory):
    gateway = gateway_factory(proxy_yaml(count=100, duration="3s"))
    assert call(gateway, ALICE).status_code == 200
    refused = call(gateway, ALICE)
    assert refused.status_code == 429
    reset = int(refused.headers["X-RateLimit-Reset"])
    assert reset - time.time() <= 4
    time.sleep(max(0.0, reset - time.time()))
    assert call(gateway, ALICE).status_code == 200


def test_openai_sdk_sync_and_async(gateway_factory, fresh_mock):
    gateway = gateway_factory(proxy_yaml(count=1000))
    client = openai.OpenAI(
        base_url=f"{gateway.url}/rate-limited-proxy", api_key=ALICE, max_retries=0
    )
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello!"}], max_tokens=50
    )
    completion = raw.parse()
    assert completion.usage.completion_tokens == 50
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) == 1000 - completion.usage.total_tokens

    embedding = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert embedding.usage.prompt_tokens > 0
    response = client.responses.create(model="gpt-4o-mini", input="Hi", max_output_tokens=20)
    assert response.usage.output_tokens == 20

    async def use_async() -> None:
        async_client = openai.AsyncOpenAI(
            base_url=f"{gateway.url}/rate-limited-proxy", api_key=ALICE, max_retries=0
        )
        result = await async_client.completions.create(
            model="gpt-3.5-turbo-instruct", prompt="Say hi", max_tokens=30
        )
        assert result.usage.completion_tokens == 30
        await async_client.close()

    asyncio.run(use_async())

    # G3 across all four endpoints: the window holds exactly what the provider reported.
    served = fresh_mock.stats()["tokens_served"]["total"]
    assert charged_so_far(gateway, budget=1000) == served

    bad = openai.OpenAI(base_url=f"{gateway.url}/rate-limited-proxy", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        bad.chat.completions.create(**HELLO)
    assert "Incorrect API key" in str(raised.value)
    assert fresh_mock.stats()["requests"] == 5  # four calls and the probe


def test_openai_sdk_rate_limit_error_and_retry_wait(gateway_factory):
    gateway = gateway_factory(proxy_yaml(count=100, duration="2s"))
    client = openai.OpenAI(
        base_url=f"{gateway.url}/rate-limited-proxy", api_key=ALICE, max_retries=0
    )
    client.chat.completions.create(**HELLO)
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(**HELLO)
    assert "Rate limit reached" in raised.value.message
    assert raised.value.body["code"] == "rate_limit_exceeded"
    # With retries on, the SDK waits for Retry-After / retry-after-ms and then gets through.
    retrying = client.with_options(max_retries=2)
    started = time.monotonic()
    retrying.chat.completions.create(**HELLO)
    waited = time.monotonic() - started
    assert waited >= 0.5  # it did wait for the window rather than hammering the gate


def test_upstream_errors_pass_through_and_release(gateway_factory, fresh_mock):
    gateway = gateway_factory(proxy_yaml(count=1000))
    for status in (500, 429, 400):
        answer = call(gateway, ALICE, **{"X-Mock-Mode": f"error:{status}"})
        assert answer.status_code == status
        assert "X-TokenGate-Source" not in answer.headers  # the provider's, unchanged
        assert answer.headers["x-mock-provider"] == "1"
    provider_429 = call(gateway, ALICE, **{"X-Mock-Mode": "error:429"})
    assert provider_429.headers["retry-after"] == "7"
    assert provider_429.headers["x-ratelimit-remaining-tokens"] == "0"
    ok = call(gateway, ALICE, body={**HELLO, "max_tokens": 10})
    assert ok.status_code == 200
    # Nothing was charged for the errors: only the successful call is in the window.
    assert int(ok.headers["X-RateLimit-Remaining"]) == 1000 - ok.json()["usage"]["total_tokens"]


def test_unreachable_provider_still_gets_401_429_and_releases(tmp_path, fresh_mock):
    proxies = proxy_yaml(count=1000)
    config = write_quotas(tmp_path / "q.yaml", "http://127.0.0.1:9", proxies)
    gateway = Gateway.start(config, "reverse:http://127.0.0.1:9")
    try:
        assert call(gateway, None).status_code == 401
        too_big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "word " * 1200}]}
        refused = call(gateway, ALICE, body=too_big)
        assert refused.status_code == 429  # the prompt alone exceeds the 1000-token limit
        assert refused.headers["x-should-retry"] == "false"
        assert "Request too large" in refused.json()["error"]["message"]
        # ~600 prompt tokens: a leaked reservation would leave no room for the second one.
        big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "word " * 590}]}
        for _ in range(3):
            down = call(gateway, ALICE, body=big)
            assert down.status_code == 502
            assert "X-TokenGate-Source" not in down.headers  # mitmproxy's own answer
    finally:
        gateway.stop()


def test_malformed_json_gets_400_from_the_gate(gateway_factory, fresh_mock):
    gateway = gateway_factory()
    answer = httpx.post(
        f"{gateway.url}/rate-limited-proxy/chat/completions",
        content=b'{"model": "gpt-4o", "messages": [',
        headers={"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == 400
    assert answer.headers["X-TokenGate-Source"] == "gateway"
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert fresh_mock.stats()["requests"] == 0


def test_streamed_request_passes_and_is_charged_by_tokenizer(gateway_factory, fresh_mock):
    gateway = gateway_factory(proxy_yaml(count=10_000))
    body = {**HELLO, "stream": True, "max_tokens": 40}
    with httpx.stream(
        "POST",
        f"{gateway.url}/rate-limited-proxy/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {ALICE}", "X-Mock-Mode": "no-usage"},
        timeout=30,
    ) as streamed:
        assert streamed.status_code == 200
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert "X-RateLimit-Remaining" in streamed.headers
        payload = b"".join(streamed.iter_bytes())
    assert payload.rstrip().endswith(b"data: [DONE]")
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in payload.decode().splitlines()
        if line.startswith("data: {")
    )
    assert text
    after = call(gateway, ALICE, body={**HELLO, "max_tokens": 1})
    charged_before = 10_000 - int(after.headers["X-RateLimit-Remaining"])
    charged_before -= after.json()["usage"]["total_tokens"]
    # prompt estimate (9) + the 40 streamed tokens, counted by the gate's tokenizer
    assert charged_before == 9 + 40


def test_ungoverned_paths_pass_untouched_unless_they_carry_a_key(gateway_factory, fresh_mock):
    gateway = gateway_factory()
    url = f"{gateway.url}/v1/chat/completions"
    answer = httpx.post(url, json=HELLO, timeout=30)  # no credential: not the gate's business
    assert answer.status_code == 401 and answer.headers.get(SOURCE) is None  # the mock's 401
    # A typo of the context with the caller's key, and any key to a configured provider's host:
    # refused by the gate, never forwarded.
    for path, key in (("/RATE-LIMITED-PROXY", ALICE), ("/rate-limited-proxyX", ALICE), ("", "x")):
        answer = httpx.post(
            f"{gateway.url}{path}/v1/chat/completions",
            json=HELLO,
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert answer.status_code == 404 and answer.headers[SOURCE] == "gateway"
        assert "/rate-limited-proxy" in answer.json()["error"]["message"]
    assert fresh_mock.stats()["by_endpoint"] == {"chat/completions": 1}
    # The documented way through for other paths: tokengate_passthrough.
    passing = gateway_factory(None, "--set", "tokengate_passthrough=/v1")
    answer = httpx.post(
        f"{passing.url}/v1/chat/completions",
        json=HELLO,
        headers={"Authorization": f"Bearer {PROVIDER_KEY}"},
        timeout=30,
    )
    assert answer.status_code == 200
    assert "X-RateLimit-Remaining" not in answer.headers


def test_provider_key_never_in_saved_flows_or_log(gateway_factory, fresh_mock, tmp_path):
    flows = tmp_path / "saved.flows"
    gateway = gateway_factory(proxy_yaml(count=1000), "-w", str(flows), flow_detail=4)
    assert call(gateway, ALICE).status_code == 200
    assert call(gateway, ALICE, **{"X-Mock-Mode": "error:500"}).status_code == 500
    assert call(gateway, None).status_code == 401
    with (
        httpx.stream(
            "POST",
            f"{gateway.url}/rate-limited-proxy/chat/completions",
            json={**HELLO, "stream": True},
            headers={"Authorization": f"Bearer {ALICE}", "X-Mock-Mode": "cut"},
            timeout=30,
        ) as cut,
        pytest.raises(httpx.HTTPError),
    ):
        b"".join(cut.iter_bytes())
    # in flight at shutdown: a slow request that is still waiting for its answer
    slow = httpx.AsyncClient(timeout=30)
    received_before = fresh_mock.stats()["requests"]

    def provider_holds_it() -> bool:
        """The mock has the slow request (it answers only after its delay)."""
        return (
            fresh_mock.stats()["requests"] > received_before
            and fresh_mock.last_request_headers().get("x-mock-mode") == "slow"
        )

    async def start_slow():
        task = asyncio.create_task(
            slow.post(
                f"{gateway.url}/rate-limited-proxy/chat/completions",
                json=HELLO,
                headers={
                    "Authorization": f"Bearer {ALICE}",
                    "X-Mock-Mode": "slow",
                    "X-Mock-Delay": "5",
                },
            )
        )
        for _ in range(500):  # at most 10 s
            if await asyncio.to_thread(provider_holds_it):
                break
            await asyncio.sleep(0.02)
        assert provider_holds_it() and not task.done()  # sent upstream, not answered yet
        assert gateway.stop() is not None
        with pytest.raises(httpx.HTTPError):
            await task
        await slow.aclose()

    asyncio.run(start_slow())
    saved = flows.read_bytes()
    assert saved.count(b"rate-limited-proxy") + saved.count(b"/v1/chat/completions") >= 4
    assert PROVIDER_KEY.encode() not in saved
    assert ALICE.encode() not in saved
    assert PROVIDER_KEY not in gateway.process.output
    assert ALICE not in gateway.process.output
    ledger = (tmp_path / ".state" / "ledger.jsonl").read_text()  # the default place
    assert len(ledger.splitlines()) >= 4
    assert PROVIDER_KEY not in ledger and ALICE not in ledger


@pytest.mark.parametrize(
    ("fragment", "line", "reason"),
    [
        ("    colour: blue\n", 10, "unknown field 'colour'"),
        (
            "    token_limits:\n      total_tokens:\n        - {count: 5, duration: 1w}\n",
            12,
            "bad duration",
        ),
        (
            "    token_limits:\n      total_tokens:\n        - {count: -5, duration: 1m}\n",
            12,
            "must be a whole number >= 1",
        ),
    ],
)
def test_broken_quotas_refuse_to_start(tmp_path, fresh_mock, fragment, line, reason):
    proxies = "  p:\n    context: /p\n    provider: mock\n" + fragment
    config = write_quotas(tmp_path / "quotas.yaml", fresh_mock.url, proxies)
    gateway = Gateway.start(config, f"reverse:{fresh_mock.url}", expect_failure=True)
    assert gateway.process.popen.returncode == 1
    assert f"{config}:{line}: " in gateway.process.output
    assert reason in gateway.process.output


def test_missing_provider_and_key_variable_refuse_to_start(tmp_path, fresh_mock):
    proxies = "  p:\n    context: /p\n    provider: nowhere\n"
    config = write_quotas(tmp_path / "quotas.yaml", fresh_mock.url, proxies)
    gateway = Gateway.start(config, f"reverse:{fresh_mock.url}", expect_failure=True)
    assert gateway.process.popen.returncode == 1
    assert f"{config}:9: provider 'nowhere' is not defined" in gateway.process.output

    config.write_text(
        config.read_text().replace("TOKENGATE_TEST_PROVIDER_KEY", "TOKENGATE_UNSET_VARIABLE")
    )
    gateway = Gateway.start(config, f"reverse:{fresh_mock.url}", expect_failure=True)
    assert gateway.process.popen.returncode == 1
    assert f"{config}:4: environment variable TOKENGATE_UNSET_VARIABLE" in gateway.process.output


def test_reset_header_is_epoch_seconds_rounded_up(gateway_factory):
    gateway = gateway_factory()
    call(gateway, ALICE)
    refused = call(gateway, ALICE)
    reset = int(refused.headers["X-RateLimit-Reset"])
    wait_ms = int(refused.headers["retry-after-ms"])
    assert reset >= math.floor(time.time() + wait_ms / 1000 - 1)


def test_loading_saved_flows_leaves_them_as_they_were(gateway_factory, tmp_path):
    saved = tmp_path / "saved.flows"
    gateway = gateway_factory(None, "-w", str(saved))
    statuses = [call(gateway, ALICE).status_code, call(gateway, ALICE).status_code]
    statuses.append(call(gateway, None).status_code)
    assert statuses == [200, 429, 401]
    gateway.stop()
    # The saved flows carry the gate's notes; reading them back with the addon loaded must not
    # make it act on them again (no 401 for a flow whose key was stripped, no new charges).
    rewritten = tmp_path / "rewritten.flows"
    subprocess.run(
        [str(MITMDUMP), "-nr", str(saved), "-w", str(rewritten), "-s", "addons/tokengate.py",
         "--set", f"tokengate_config={tmp_path / 'quotas.yaml'}"],
        cwd=ROOT, env={**os.environ, "TOKENGATE_TEST_PROVIDER_KEY": PROVIDER_KEY},
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    with rewritten.open("rb") as handle:
        flows = list(io.FlowReader(handle).stream())
    assert [flow.response.status_code for flow in flows] == statuses


def test_shipped_quotas_file_reproduces_the_reference(tmp_path, fresh_mock):
    """The repository's own quotas.yaml, only pointed at this run's mock port."""
    shipped = (ROOT / "quotas.yaml").read_text()
    assert "http://127.0.0.1:4010/v1" in shipped
    config = tmp_path / "quotas.yaml"
    config.write_text(shipped.replace("http://127.0.0.1:4010", fresh_mock.url))
    gateway = Gateway.start(
        config,
        f"reverse:{fresh_mock.url}",
        env={"TOKENGATE_MOCK_PROVIDER_KEY": PROVIDER_KEY},
    )
    try:
        demo_key = "tg-demo-key-for-the-bundled-mock-only"  # what scripts/demo.sh prints
        first = call(gateway, demo_key)
        assert first.status_code == 200 and "X-RateLimit-Remaining" in first.headers
        second = call(gateway, demo_key)
        assert second.status_code == 429 and int(second.headers["X-RateLimit-Reset"]) > time.time()
        assert call(gateway, None).status_code == 401
        assert fresh_mock.stats()["requests"] == 1
    finally:
        gateway.stop()


def test_only_metered_endpoints_and_the_model_list_are_served(gateway_factory, fresh_mock):
    gateway = gateway_factory()
    auth = {"Authorization": f"Bearer {ALICE}"}
    models = httpx.get(f"{gateway.url}/rate-limited-proxy/models", headers=auth, timeout=30)
    assert models.headers.get("x-mock-provider") == "1"  # forwarded (the mock has no list)
    assert fresh_mock.stats()["requests"] == 1
    for method, path in [
        ("POST", "/files"),
        ("DELETE", "/models/ft-mine"),
        ("POST", "/embeddings/../chat/completions"),
    ]:
        # http.client sends the path as written (httpx would resolve the dot segments itself)
        connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
        connection.request(method, f"/rate-limited-proxy{path}", body=b"{}", headers=auth)
        refused = connection.getresponse()
        assert refused.status == 403, path
        assert refused.getheader("X-TokenGate-Source") == "gateway"
        assert json.loads(refused.read())["error"]["code"] == "endpoint_not_allowed"
        connection.close()
    assert httpx.post(f"{gateway.url}/rate-limited-proxy/files").status_code == 401
    assert fresh_mock.stats()["requests"] == 1


def test_log_shows_the_url_each_request_was_sent_to(gateway_factory, fresh_mock):
    """mitmdump's flow log names the provider URL a call was sent to, not the provider's host
    with the caller's path (a URL that never existed); a call the gate answered itself was
    never sent and shows the path its caller used."""
    gateway = gateway_factory(proxy_yaml(count=1000), flow_detail=1)
    assert call(gateway, ALICE).status_code == 200
    assert call(gateway, None).status_code == 401
    logged = re.compile(r"POST (\S+)\s*\n\s*<< (\d+)")
    assert wait_until(lambda: len(logged.findall(gateway.process.output)) == 2)
    (sent, sent_status), (refused, refused_status) = logged.findall(gateway.process.output)
    assert (sent, sent_status) == (f"{fresh_mock.url}/v1/chat/completions", "200")
    assert refused_status == "401" and refused.startswith(f"{fresh_mock.url}/rate-limited-proxy/")
