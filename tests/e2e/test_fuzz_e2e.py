"""A seeded run of generated hostile raw HTTP/1.1 requests, over plain sockets, through a real
mitmdump with TokenGate in front of the real mock provider.

Every answer is classified by who made it: the gate (`X-TokenGate-Source: gateway`), the provider
(the mock's `x-mock-provider` header) or mitmproxy itself (neither: its own 400 for requests it
cannot parse, 502 when the provider broke the connection). Per case the status must be one that
party may give, and the gate's answers must be OpenAI-shaped errors (or the caller's own usage).
At the end mitmdump's log holds no addon error, nothing is left reserved, and what the gate
charged each key equals what the mock delivered to it (tagged by `X-Mock-Tag`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import socket
from collections import Counter
from dataclasses import dataclass

import pytest

from tests.support.harness import ODD_PATHS
from tests.support.processes import Gateway, wait_until, write_quotas
from tests.support.quotas import ALICE, BOB, key_entries

CASES = int(os.environ.get("TOKENGATE_FUZZ_CASES", "400"))
SEED = int(os.environ.get("TOKENGATE_FUZZ_SEED", "20261129"))
MAX_BODY = 64 * 1024
# mitmproxy reads a whole request body into memory before any hook can refuse it (the gate's 413
# included); its own body_size_limit stops that early. Deployments set both (README).
BODY_SIZE_LIMIT = "1m"
PROXIES = (
    "  p:\n    context: /p\n    provider: mock\n"
    "    token_limits:\n      total_tokens:\n        - {count: 100000000, duration: 1d}\n"
    "    keys:\n" + key_entries(alice=ALICE) + "  small:\n    context: /small\n    provider: mock\n"
    "    completion_reserve: 40\n"
    "    token_limits:\n      total_tokens:\n        - {count: 3000, duration: 1d}\n"
    "    keys:\n" + key_entries(bob=BOB)
)
CALLERS = {"/p": ("alice", ALICE), "/small": ("bob", BOB)}
GATE_STATUSES = {400, 401, 403, 404, 413, 429, 503}
MITMPROXY_STATUSES = {400, 413, 414, 431, 501, 502}
# Modes where the provider breaks the connection, so mitmproxy's own 502 is the faithful answer.
BREAKING_MODES = ("cut", "reset", "reset-mid")
MOCK_MODES = ["normal"] * 12 + [
    "no-usage",
    "usage-negative",
    "usage-absurd",
    "usage-float",
    "usage-string",
    "invalid-json",
    "split",
    "cut",
    "reset-mid",
    "error:500",
    "error:429",
    "error:400",
]
ODD_SUFFIXES = [
    *ODD_PATHS,
    "/v1/chat/completions",
    "/completions",
    "/embeddings",
    "/responses",
    "/models",
    "/models/gpt-4o",
    "/chat%2fcompletions/../completions",
    "/" + "a" * 9000,
    "/chat/completions%00",
    "/ch\u00e4t/completions",
]


def chat_body(rng: random.Random) -> dict:
    body = {
        "model": rng.choice(["gpt-4o-mini", "gpt-4o", "gpt-4", "unknown-model-x", "", 7, None]),
        "messages": rng.choice(
            [
                [{"role": "user", "content": "Hello!"}],
                [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
                [{"role": "user", "content": [{"type": "text", "text": "caf\u00e9 \ud83d\ude00"}]}],
                [{"role": "user", "content": None}],
                [{"role": "?", "content": {"x": 1}}],
                "not a list",
                [],
            ]
        ),
    }
    body["max_tokens"] = rng.choice([None, 1, 5, 20, 0, -1, 10**20, 2.5, "12", True, [1], 10**6])
    if rng.random() < 0.2:
        body["n"] = rng.choice([2, 0, -3, 10**9, "2", 1.5])
    if rng.random() < 0.4:
        body["stream"] = rng.choice([True, True, False, "yes", None])
    if rng.random() < 0.1:
        body["stream_options"] = rng.choice([{"include_usage": True}, "x", None, {"x": 1}])
    return {k: v for k, v in body.items() if v is not None or rng.random() < 0.3}


def body_bytes(rng: random.Random, suffix: str) -> bytes:
    kind = rng.choices(
        ["object", "truncated", "non-utf8", "nested", "huge", "not-object", "empty"],
        weights=[14, 2, 1, 1, 1, 1, 1],
    )[0]
    if suffix.endswith("embeddings"):
        whole = {"model": "text-embedding-3-small", "input": rng.choice(["hi", ["a", "b"], 5])}
    elif suffix.endswith("responses"):
        whole = {"model": "gpt-4o", "input": "hi", "max_output_tokens": rng.choice([16, 3, -2])}
        whole["stream"] = rng.random() < 0.5
    else:
        whole = chat_body(rng)
    raw = json.dumps(whole).encode()
    if kind == "truncated":
        return raw[: rng.randrange(max(1, len(raw)))]
    if kind == "non-utf8":
        return b'{"model": "\xff\xfe", "messages": [{"role": "user", "content": "\xc3("}]}'
    if kind == "nested":
        depth = rng.choice([100, 2_000, 50_000])
        return b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "huge":
        size = rng.choice([MAX_BODY - 2_000, MAX_BODY + 10])
        text = "word " * (size // 5)
        return json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]})[
            :size
        ].encode()
    if kind == "not-object":
        return rng.choice([b"[]", b"42", b'"x"', b"null", b"[{}]"])
    if kind == "empty":
        return b""
    return raw


@dataclass
class Case:
    raw: bytes
    method: str
    tag: str | None  # the key whose books this case may move
    mode: str
    note: str  # what is odd about it, for failure messages


def generate(rng: random.Random, index: int) -> Case:
    context = rng.choices(["/p", "/small", "/P", "/elsewhere"], weights=[10, 3, 1, 1])[0]
    suffix = "/chat/completions" if rng.random() < 0.55 else rng.choice(ODD_SUFFIXES)
    method = rng.choices(
        ["POST", "GET", "PATCH", "OPTIONS", "TRACE", "FOO", "HEAD", "DELETE"],
        weights=[20, 2, 1, 1, 1, 1, 1, 1],
    )[0]
    tag, secret = CALLERS.get(context, ("stranger", ALICE))
    mode = rng.choice(MOCK_MODES)
    body = body_bytes(rng, suffix) if method not in ("GET", "HEAD", "TRACE") else b""
    headers: list[tuple[bytes, bytes]] = []
    notes = []
    host = rng.choices(["ok", "missing", "twice", "odd"], weights=[16, 1, 1, 1])[0]
    if host != "missing":
        headers.append((b"Host", b"gateway.test"))
    if host == "twice":
        headers.append((b"Host", b"other.test"))
    if host == "odd":
        headers[-1] = (b"Host", b"g\xffw:99999")
    notes.append(f"host={host}")
    auth = rng.choices(
        ["bearer", "x-api-key", "both", "twice", "none", "wrong", "odd", "huge", "lower"],
        weights=[16, 2, 1, 1, 1, 1, 1, 1, 1],
    )[0]
    notes.append(f"auth={auth}")
    key = secret.encode()
    if auth in ("bearer", "both", "twice"):
        headers.append((b"Authorization", b"Bearer " + key))
    if auth in ("x-api-key", "both"):
        headers.append((b"X-API-Key", key))
    if auth == "twice":
        headers.append((b"Authorization", b"Bearer tg-someone-else"))
    if auth == "wrong":
        headers.append((b"Authorization", b"Bearer tg-wrong-key"))
    if auth == "odd":
        headers.append((b"Authorization", rng.choice([b"Bearer \xff\xfe\x80", b"Bearer", b"\x01"])))
    if auth == "huge":
        headers.append((b"Authorization", b"Bearer " + b"k" * rng.choice([5_000, 70_000])))
    if auth == "lower":
        headers.append((b"authorization", b"bearer " + key))
    if rng.random() < 0.8:
        content_type = rng.choice([b"application/json"] * 4 + [b"text/plain", b"x/\xff"])
        headers.append((b"Content-Type", content_type))
    framing = rng.choices(
        ["length", "chunked", "none", "both", "te-odd", "length-wrong"],
        weights=[14, 2, 1, 1, 1, 1],
    )[0]
    notes.append(f"framing={framing}")
    if framing in ("chunked", "both"):
        headers.append((b"Transfer-Encoding", b"chunked"))
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
        if framing == "both":
            headers.append((b"Content-Length", str(len(body)).encode()))
    elif framing == "te-odd":
        headers.append((b"Transfer-Encoding", rng.choice([b"gzip, chunked", b"identity", b"x"])))
        headers.append((b"Content-Length", str(len(body)).encode()))
        payload = body
    elif framing == "length-wrong":
        headers.append((b"Content-Length", rng.choice([b"-1", b"abc", b"99999999999999999999"])))
        payload = body
    else:
        if framing == "length":
            headers.append((b"Content-Length", str(len(body)).encode()))
        payload = body if framing == "length" else b""
    if rng.random() < 0.05:
        headers.append((b"X-Broken-Header-Line-Without-Colon", b""))
        notes.append("no-colon")
    headers.append((b"X-Mock-Mode", mode.encode()))
    headers.append((b"X-Mock-Tag", tag.encode()))
    headers.append((b"Connection", b"close"))
    target = (context + suffix).encode("utf-8")
    lines = [method.encode() + b" " + target + b" HTTP/1.1"]
    for name, value in headers:
        lines.append(name if name.startswith(b"X-Broken") else name + b": " + value)
    raw = b"\r\n".join(lines) + b"\r\n\r\n" + payload
    note = f"#{index} {method} {context + suffix[:60]} mode={mode} " + " ".join(notes)
    return Case(raw, method, tag, mode, note)


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    complete: bool


def send(port: int, case: Case) -> Answer | None:
    """The answer to one raw request; None if the connection closed without any."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        with contextlib.suppress(OSError):  # refused mid-send: the answer may still be there
            sock.sendall(case.raw)
        response = http.client.HTTPResponse(sock, method=case.method)
        try:
            response.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return None
        try:
            return Answer(response.status, response.headers, response.read(), True)
        except (http.client.IncompleteRead, ConnectionResetError) as cut:
            partial = getattr(cut, "partial", b"")
            return Answer(response.status, response.headers, partial, False)


def who_answered(answer: Answer) -> str:
    if answer.headers.get("X-TokenGate-Source") == "gateway":
        return "gate"
    if answer.headers.get("x-mock-provider") == "1":
        return "provider"
    return "mitmproxy"


def check(case: Case, answer: Answer | None) -> str:
    """Who answered, after checking that the answer is one that party may give."""
    if answer is None:  # no status line at all: only when the provider reset the connection
        assert case.mode in BREAKING_MODES, case.note
        return "closed"
    source = who_answered(answer)
    if source == "gate":
        assert answer.complete, case.note
        if case.method == "HEAD":  # a HEAD answer has no body
            assert answer.status in GATE_STATUSES | {200}, case.note
        elif answer.status == 200:
            assert json.loads(answer.body)["object"] == "tokengate.usage", case.note
        else:
            assert answer.status in GATE_STATUSES, (answer.status, case.note)
            error = json.loads(answer.body)["error"]
            assert set(error) == {"message", "type", "param", "code"}, case.note
    elif source == "mitmproxy":
        assert answer.status in MITMPROXY_STATUSES, (answer.status, case.note, answer.body[:200])
        if answer.status == 502:  # the provider broke the connection (or refused a path the
            # gate does not govern, e.g. with a header line longer than it reads)
            assert case.mode in BREAKING_MODES or case.tag == "stranger", case.note
    elif not answer.complete:
        assert case.mode in BREAKING_MODES, case.note
    return source


@pytest.fixture
def gateway(tmp_path, fresh_mock):
    config = write_quotas(tmp_path / "quotas.yaml", fresh_mock.url, PROXIES)
    started = Gateway.start(
        config,
        f"reverse:{fresh_mock.url}",
        *("--set", f"tokengate_max_body={MAX_BODY}", "--set", f"body_size_limit={BODY_SIZE_LIMIT}"),
    )
    yield started
    started.stop()


def standing(port: int, context: str, secret: str) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", f"{context}/tokengate/usage", headers={"X-API-Key": secret})
        answer = connection.getresponse()
        assert answer.status == 200
        (limit,) = json.loads(answer.read())["limits"]
        return limit
    finally:
        connection.close()


def test_generated_hostile_requests_through_a_real_mitmdump(gateway, fresh_mock):
    rng = random.Random(SEED)
    by_source: Counter[str] = Counter()
    by_status: Counter[tuple[str, int]] = Counter()
    for index in range(CASES):
        case = generate(rng, index)
        answer = send(gateway.port, case)
        source = check(case, answer)
        by_source[source] += 1
        if answer is not None:
            by_status[(source, answer.status)] += 1
    print(f"\nfuzz e2e: {CASES} cases (seed {SEED}); answered by {dict(by_source)}")
    print("  " + ", ".join(f"{s} {c}: {n}" for (s, c), n in sorted(by_status.items())))
    # It did reach every party, the provider included, with answers of each kind.
    assert by_source["gate"] and by_source["provider"] and by_source["mitmproxy"]
    assert {status for (source, status) in by_status if source == "gate"} >= {401, 403, 413}
    delivered = fresh_mock.stats()["delivered_by_tag"]
    for context, (tag, secret) in CALLERS.items():

        def settled(context=context, secret=secret) -> bool:
            return standing(gateway.port, context, secret)["reserved"] == 0

        assert wait_until(settled, timeout=10), f"{tag}: a reservation was left"
        used = standing(gateway.port, context, secret)["used"]
        assert used == delivered.get(tag, 0), (tag, used, delivered)
        assert used > 0
    log = gateway.process.output
    for bad in ("Traceback", "Addon error", "error in "):
        assert bad not in log, log[-3000:]
