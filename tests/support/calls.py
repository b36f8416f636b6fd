"""Calls to a real gateway's `rate-limited-proxy` (see `quotas.proxy_yaml`) over HTTP."""

from __future__ import annotations

import httpx

from tests.support.processes import Gateway
from tests.support.quotas import ALICE

HELLO = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}


def call(gateway: Gateway, key: str | None, body=HELLO, path="/chat/completions", **headers):
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(
        f"{gateway.url}/rate-limited-proxy{path}", json=body, headers=headers, timeout=30
    )


def charged_so_far(gateway: Gateway, budget: int) -> int:
    """What alice's window holds before this probe: the probe's own cost is taken back out."""
    probe = call(gateway, ALICE, body={**HELLO, "max_tokens": 1})
    assert probe.status_code == 200
    own = probe.json()["usage"]["total_tokens"]
    return budget - int(probe.headers["X-RateLimit-Remaining"]) - own
