"""No secret leaks: one full run through a real mitmdump, then every artefact is searched for the
provider key and every caller key (as sent, base64 and URL-encoded).

The run: several callers, streamed and not, 200/401/413/429, upstream errors and a cut stream,
the usage endpoint; mitmdump at flow_detail=4 and debug log, saving flows with `-w`, the ledger
on, the default SQLite store. The artefacts: mitmdump's output, the ledger, every header and body
the clients received, the saved flows (raw bytes, and every field re-read with FlowReader), the
SQLite files, and the mock's record of what it received (the provider key must be there: the
record works; no caller key may be). Also: caller keys are never compared as secrets, only
their SHA-256 digests with `hmac.compare_digest`.
"""

from __future__ import annotations

import base64
import hmac

import httpx
import openai
import pytest
from tokengate_core import keys
from tokengate_core.commands import status_report
from tokengate_core.keys import KeyRing, StoredKey, hash_key

from tests.support.harness import gate_in_harness
from tests.support.leaks import flow_fields, leaks
from tests.support.processes import PROVIDER_KEY, Gateway, Mock, write_quotas
from tests.support.quotas import ALICE, BOB, key_entries

GUESS = "tg-a-wrong-guess-0123456789"  # a key a caller tried: a secret of someone, maybe
CONTEXT = "/secret"
PROXIES = (
    f"  secret:\n    context: {CONTEXT}\n    provider: mock\n"
    "    token_limits:\n      total_tokens:\n        - {count: 400, duration: 1h}\n"
    "    keys:\n" + key_entries(alice=ALICE, bob=BOB)
)
HELLO = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}


CALLER_KEYS = (ALICE, BOB, GUESS)


def drive(gateway: Gateway) -> list[bytes]:
    """Every kind of call; what the clients received (status line, headers, body) of each."""
    received: list[bytes] = []
    base = f"{gateway.url}{CONTEXT}"

    def keep(answer: httpx.Response) -> httpx.Response:
        head = f"{answer.status_code}\n" + "".join(f"{k}: {v}\n" for k, v in answer.headers.items())
        received.append(head.encode() + answer.content)
        return answer

    def call(key: str | None, body=HELLO, path="/chat/completions", **headers):
        if key is not None:
            headers.setdefault("Authorization", f"Bearer {key}")
        return keep(httpx.post(base + path, json=body, headers=headers, timeout=30))

    assert call(ALICE, {**HELLO, "max_tokens": 20}).status_code == 200
    assert call(None, **{"X-API-Key": BOB}).status_code == 200
    assert call(None).status_code == 401
    assert call(GUESS).status_code == 401
    basic = "Basic " + base64.b64encode(b"u:" + ALICE.encode()).decode()
    assert call(None, Authorization=basic).status_code == 401
    assert call(ALICE, {**HELLO, "pad": "x" * 5000}).status_code == 413
    assert call(ALICE, **{"X-Mock-Mode": "error:500"}).status_code == 500
    assert call(ALICE, **{"X-Mock-Mode": "error:429"}).status_code == 429
    assert call(ALICE, {"model": "gpt-4o", "input": "hi"}, "/embeddings").status_code == 200
    assert call(ALICE, path="/files").status_code == 403
    usage = keep(httpx.get(base + "/tokengate/usage", headers={"X-API-Key": ALICE}))
    assert usage.status_code == 200
    with httpx.stream(
        "POST",
        base + "/chat/completions",
        json={**HELLO, "stream": True},
        headers={"Authorization": f"Bearer {BOB}", "X-Mock-Mode": "cut"},
        timeout=30,
    ) as cut:
        body = b""
        with pytest.raises(httpx.HTTPError):
            for chunk in cut.iter_bytes():
                body += chunk
        received.append(str(cut.headers).encode() + body)
    client = openai.OpenAI(base_url=base, api_key=BOB, max_retries=0)
    with client.chat.completions.with_streaming_response.create(
        **HELLO, stream=True, stream_options={"include_usage": True}
    ) as raw:
        received.append(str(raw.headers).encode() + raw.read())
    while call(BOB, {**HELLO, "max_tokens": 100}).status_code != 429:
        assert len(received) < 40  # the 400-token budget runs out within a few calls
    return received


def test_no_secret_in_any_artefact_of_a_full_run(tmp_path):
    record = tmp_path / "provider-received.jsonl"
    mock = Mock.start("--record", str(record))
    flows = tmp_path / "saved.flows"
    config = write_quotas(tmp_path / "quotas.yaml", mock.url, PROXIES)
    gateway = Gateway.start(
        config,
        f"reverse:{mock.url}",
        *("-w", str(flows), "--set", "termlog_verbosity=debug", "--set", "tokengate_max_body=4k"),
        flow_detail=4,
    )
    try:
        received = drive(gateway)
    finally:
        gateway.stop()
        mock.process.stop()
    state = tmp_path / ".state"
    ledgers = sorted(state.glob("ledger.jsonl*"))
    stores = sorted(state.glob("tokengate.sqlite3*"))
    assert ledgers and stores and flows.stat().st_size
    artefacts: dict[str, bytes] = {
        "mitmdump output": gateway.process.output.encode("utf-8", "surrogateescape"),
        "responses received": b"\n".join(received),
        "saved flows (raw)": flows.read_bytes(),
        "saved flows (re-read)": flow_fields(flows),
        **{f"ledger {p.name}": p.read_bytes() for p in ledgers},
        **{f"store {p.name}": p.read_bytes() for p in stores},
    }
    # The run did produce what is searched: the keys' names, flows printed in full.
    assert b'"key":"bob"' in artefacts["ledger ledger.jsonl"]
    assert b"x-mock-provider" in artefacts["mitmdump output"]  # headers and bodies printed
    assert b"Hello!" in artefacts["mitmdump output"]
    assert len(received) >= 15
    secrets = (PROVIDER_KEY, *CALLER_KEYS)
    found = {name: leaks(data, secrets) for name, data in artefacts.items()}
    assert found == {name: [] for name in artefacts}
    # The provider got its key (so the record is searched for real) and no caller key.
    provider_side = record.read_bytes()
    assert PROVIDER_KEY.encode() in provider_side
    assert leaks(provider_side, CALLER_KEYS) == []


async def test_status_command_names_keys_never_their_secrets(tmp_path, monkeypatch):
    with gate_in_harness(tmp_path, monkeypatch, PROXIES) as (_, gate, _):
        report = await status_report(gate)
    assert "secret/alice" in report and "secret/bob" in report
    assert leaks(report.encode(), (PROVIDER_KEY, *CALLER_KEYS)) == []
    assert hash_key(ALICE) not in report


class Untouchable(str):
    """A secret that fails the test if anything compares it (==, !=, ordering)."""

    def _refuse(self, other):
        raise AssertionError("the secret itself was compared")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
    __hash__ = str.__hash__


def test_caller_keys_are_compared_only_as_digests_in_constant_time(monkeypatch):
    ring = KeyRing([StoredKey("alice", hash_key(ALICE)), StoredKey("bob", hash_key(BOB))])
    compared: list[tuple[str, str]] = []
    compare = hmac.compare_digest

    def recording_compare(a, b):
        compared.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", recording_compare)
    assert ring.find(Untouchable(ALICE)).name == "alice"
    assert ring.find(Untouchable(GUESS)) is None
    # The one comparison that decided was of two SHA-256 digests, by hmac.compare_digest.
    assert compared == [(hash_key(ALICE), hash_key(ALICE))]
