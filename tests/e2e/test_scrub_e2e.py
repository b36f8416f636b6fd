"""A provider that echoes the key it received, end to end: a real mitmdump in front of the mock
in its echo-key mode hands the caller neither the key nor a piece of it."""

from __future__ import annotations

import json

import httpx
from tokengate_core.scrub import MARK, MARK_HEADER, PLACEHOLDER

from tests.support.calls import HELLO
from tests.support.processes import PROVIDER_KEY, Gateway, write_quotas
from tests.support.quotas import ALICE, proxy_yaml


def test_provider_echo_never_reaches_the_caller(tmp_path, fresh_mock):
    config = write_quotas(tmp_path / "quotas.yaml", fresh_mock.url, proxy_yaml(count=100_000))
    gateway = Gateway.start(config, f"reverse:{fresh_mock.url}")
    url = f"{gateway.url}/rate-limited-proxy/chat/completions"
    headers = {"Authorization": f"Bearer {ALICE}", "X-Mock-Mode": "echo-key"}
    try:
        refused = httpx.post(url, json=HELLO, headers=headers, timeout=30)
        streamed = [
            httpx.post(
                url, json={**HELLO, "stream": True}, headers={**headers, "X-Mock-Seed": str(seed)}
            )
            for seed in range(3)  # the key lands in pieces cut at different places
        ]
    finally:
        gateway.stop()
    assert refused.status_code == 401
    assert PROVIDER_KEY not in refused.text and PLACEHOLDER in refused.json()["error"]["message"]
    assert refused.headers["x-echo-key"] == PLACEHOLDER
    assert refused.headers[MARK_HEADER] == MARK
    for answer in streamed:
        assert answer.status_code == 200
        assert PROVIDER_KEY not in answer.text and f"You sent {PLACEHOLDER}." in answer.text
        assert answer.headers["x-echo-key"] == PLACEHOLDER
    assert fresh_mock.stats()["auth_headers_seen"] == [f"Bearer {PROVIDER_KEY}"]  # it was sent
    assert PROVIDER_KEY not in gateway.process.output
    assert gateway.process.output.count("carried the key of provider mock") == 4
    ledger = (tmp_path / ".state" / "ledger.jsonl").read_text().splitlines()
    assert [json.loads(line).get("scrubbed") for line in ledger] == [True] * 4
