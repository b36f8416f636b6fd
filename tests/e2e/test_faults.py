"""End to end: a provider that fails in every way the mock can, behind a real mitmdump.

For each fault the caller gets a faithful answer (the provider's own status, body and headers, or
mitmproxy's 502 when the provider broke the connection) and the books stay exact: after the
flow ends nothing is reserved, and what the gate charged the caller equals the tokens the mock
delivered for it (its `delivered_by_tag`, one tag per test), except where design.md says
otherwise (a caller hanging up after the provider got the request keeps what was reserved).
"""

from __future__ import annotations

import itertools
import json

import httpx
import openai
import pytest
from tokengate_core import tokens
from tokengate_core.dialects.openai import estimate_prompt

from tests.support.processes import Gateway, Mock, wait_until, write_quotas
from tests.support.quotas import ALICE, key_entries

CONTEXT = "/faulty"
PROXIES = (
    f"  faulty:\n    context: {CONTEXT}\n    provider: mock\n"
    "    token_limits:\n      total_tokens:\n        - {count: 10000000, duration: 1d}\n"
    "    keys:\n" + key_entries(alice=ALICE)
)
HELLO = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}
HELLO_PROMPT = estimate_prompt("chat/completions", HELLO)
_tags = itertools.count()


@pytest.fixture(scope="module")
def mock():
    server = Mock.start()
    yield server
    server.process.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, mock):
    folder = tmp_path_factory.mktemp("faults")
    config = write_quotas(folder / "quotas.yaml", mock.url, PROXIES)
    started = Gateway.start(config, f"reverse:{mock.url}")
    yield started
    log = started.process.output  # before shutdown, which may log mitmproxy's own cancellations
    started.stop()
    assert "Traceback" not in log and "Addon error" not in log, log[-3000:]


class Books:
    """The caller's window and the mock's delivery to one tag, before and after a test's calls."""

    def __init__(self, gateway: Gateway, mock: Mock) -> None:
        self.gateway, self.mock = gateway, mock
        self.tag = f"fault-{next(_tags)}"
        self.used_before = self.standing()["used"]

    def standing(self) -> dict:
        answer = httpx.get(
            f"{self.gateway.url}{CONTEXT}/tokengate/usage", headers={"X-API-Key": ALICE}
        )
        assert answer.status_code == 200
        (window,) = answer.json()["limits"]
        return window

    def delivered(self) -> int:
        return self.mock.stats()["delivered_by_tag"].get(self.tag, 0)

    def charged(self) -> int:
        """What this test's calls cost, once nothing is reserved any more."""
        assert wait_until(lambda: self.standing()["reserved"] == 0, timeout=10), "leaked"
        return self.standing()["used"] - self.used_before

    def headers(self, mode: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {ALICE}", "X-Mock-Mode": mode, "X-Mock-Tag": self.tag}


@pytest.fixture
def books(gateway, mock) -> Books:
    return Books(gateway, mock)


def post(books: Books, mode: str, body: dict, path: str = "/chat/completions", **options):
    headers = books.headers(mode) | options.pop("headers", {})
    return httpx.post(
        f"{books.gateway.url}{CONTEXT}{path}",
        json=body,
        headers=headers,
        timeout=options.pop("timeout", 30),
    )


def stream_text(books: Books, mode: str, body: dict) -> tuple[bytes, bool]:
    """The bytes of a streamed answer as received, and whether it ended cleanly."""
    received = bytearray()
    with httpx.stream(
        "POST",
        f"{books.gateway.url}{CONTEXT}/chat/completions",
        json={**body, "stream": True},
        headers=books.headers(mode),
        timeout=30,
    ) as answer:
        assert answer.status_code == 200
        try:
            for chunk in answer.iter_bytes():
                received += chunk
        except httpx.HTTPError:
            return bytes(received), False
    return bytes(received), True


def mitmproxys_502(answer: httpx.Response) -> None:
    assert answer.status_code == 502
    assert "X-TokenGate-Source" not in answer.headers and "x-mock-provider" not in answer.headers


def test_reset_before_any_byte_is_released(books):
    mitmproxys_502(post(books, "reset", {**HELLO, "max_tokens": 20}))
    mitmproxys_502(post(books, "reset", {**HELLO, "max_tokens": 20, "stream": True}))
    assert books.charged() == 0 == books.delivered()


def test_reset_mid_answer(books):
    # A JSON answer cut by a reset is no answer: mitmproxy's 502, nothing charged or delivered.
    mitmproxys_502(post(books, "reset-mid", {**HELLO, "max_tokens": 40}))
    assert books.charged() == 0 == books.delivered()
    # A stream cut by a reset: the caller keeps what came, and is charged exactly that.
    received, clean = stream_text(books, "reset-mid", {**HELLO, "max_tokens": 40})
    assert not clean and b"data: " in received
    assert books.charged() == books.delivered() > HELLO_PROMPT


def test_provider_that_never_answers(books):
    # The caller gives up after 1 s: the provider had the request, so the reservation is
    # charged (design.md: hanging up must not make a request free), never leaked.
    with pytest.raises(httpx.ReadTimeout):
        post(books, "hang", {**HELLO, "max_tokens": 30}, timeout=1)
    assert books.charged() == HELLO_PROMPT + 30
    assert books.delivered() == 0
    # mitmproxy has no upstream read timeout of its own: a caller that waits gets mitmproxy's
    # 502 only when the provider closes the connection (here after 1 s), and is charged nothing.
    before = books.charged()
    mitmproxys_502(post(books, "hang", {**HELLO, "max_tokens": 30}, headers={"X-Mock-Delay": "1"}))
    assert books.charged() == before


def test_slow_drip_arrives_whole_and_is_charged_once(books):
    answer = post(books, "drip", {**HELLO, "max_tokens": 6})
    assert answer.status_code == 200
    usage = answer.json()["usage"]
    assert answer.headers["X-Tokens-Consumed"] == str(usage["total_tokens"])
    received, clean = stream_text(books, "drip", {**HELLO, "max_tokens": 6})
    assert clean and received.rstrip().endswith(b"data: [DONE]")
    assert b"x-tokens-consumed=" in received  # the gate's trailer, after the dribbled events
    assert books.charged() == books.delivered() == 2 * (HELLO_PROMPT + 6)


@pytest.mark.parametrize("status", [500, 502, 503])
def test_provider_5xx_passes_unchanged_and_costs_nothing(books, status):
    answer = post(books, f"error:{status}", HELLO)
    assert answer.status_code == status
    assert answer.headers["x-mock-provider"] == "1"
    assert "X-TokenGate-Source" not in answer.headers
    assert answer.json()["error"]["type"] == "server_error"
    assert books.charged() == 0 == books.delivered()


def test_providers_429_keeps_its_own_headers(books, gateway):
    answer = post(books, "error:429", HELLO)
    assert answer.status_code == 429
    # The provider's own answer: its headers as it sent them, none of the gate's.
    assert "X-TokenGate-Source" not in answer.headers
    assert answer.headers["x-mock-provider"] == "1"
    assert answer.headers["retry-after"] == "7" and answer.headers["retry-after-ms"] == "7000"
    assert answer.headers["x-ratelimit-limit-tokens"] == "30000"
    assert answer.headers["x-ratelimit-remaining-tokens"] == "0"
    assert answer.headers["x-ratelimit-reset-tokens"] == "7s"
    assert "X-RateLimit-Remaining" not in answer.headers
    client = openai.OpenAI(
        base_url=f"{gateway.url}{CONTEXT}",
        api_key=ALICE,
        max_retries=0,
        default_headers={"X-Mock-Mode": "error:429", "X-Mock-Tag": books.tag},
    )
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(**HELLO)
    assert refused.value.message.endswith("Mock provider error (error:429)")
    assert books.charged() == 0 == books.delivered()


def test_invalid_json_answer_is_charged_the_prompt(books):
    answer = post(books, "invalid-json", HELLO)
    assert answer.status_code == 200 and answer.content == b'{"id": "x", '
    assert answer.headers["X-Tokens-Consumed"] == str(HELLO_PROMPT)
    assert books.charged() == books.delivered() == HELLO_PROMPT


@pytest.mark.parametrize(
    "mode", ["no-usage", "usage-negative", "usage-absurd", "usage-float", "usage-string"]
)
def test_usage_not_believable_is_counted_by_the_tokenizer(books, mode):
    """Negative, non-integer or absurd (above 10^7 tokens, usage.MAX_BELIEVABLE_TOKENS) usage
    is treated as not reported: the gate charges its own count, marked `estimated`."""
    answer = post(books, mode, {**HELLO, "max_tokens": 12})
    assert answer.status_code == 200
    assert answer.headers["X-Tokens-Consumed"] == str(HELLO_PROMPT + 12)
    received, clean = stream_text(
        books, mode, {**HELLO, "max_tokens": 12, "stream_options": {"include_usage": True}}
    )
    assert clean
    assert f"x-tokens-consumed={HELLO_PROMPT + 12}".encode() in received
    responses = post(
        books, mode, {"model": "gpt-4o", "input": "hi", "max_output_tokens": 16}, "/responses"
    )
    assert responses.status_code == 200
    assert books.charged() == books.delivered()
    assert books.delivered() == 2 * (HELLO_PROMPT + 12) + int(
        responses.headers["X-Tokens-Consumed"]
    )


def test_cut_stream_is_charged_what_was_delivered(books):
    received, clean = stream_text(books, "cut", {**HELLO, "max_tokens": 24})
    assert not clean
    text = "".join(
        choice["delta"].get("content") or ""
        for line in received.decode().splitlines()
        if line.startswith("data: {")
        for choice in json.loads(line[6:])["choices"]
    )
    assert books.charged() == books.delivered()
    assert books.delivered() == HELLO_PROMPT + tokens.count_text(text, "gpt-4o-mini")
