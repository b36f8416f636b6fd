"""A whole TokenGate pipeline inside mitmproxy's test harness (`taddons`), for addon tests, and
the flows those tests send through it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow
from tokengate_core import pipeline
from tokengate_core.gate import Gate

from tests.support.processes import PROVIDER_KEY, write_quotas
from tests.support.quotas import ALICE

# Paths a caller may try to slip past routing with (dot segments, encoded slashes, empty, ...).
ODD_PATHS = [
    "/tokengate/usage",
    "/files",
    "/chat/completions?x=1&y=%00",
    "/%2e%2e/chat/completions",
    "/./chat/completions",
    "/chat%2Fcompletions",
    "//chat/completions",
    "/chat/completions/",
    "/v1/../chat/completions",
    "",
    "?x",
]


@contextlib.contextmanager
def gate_in_harness(
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    proxies: str,
    gate: Gate | None = None,
    kind: str = "openai",
) -> Iterator[tuple[taddons.context, Gate, list]]:
    """`gate` (a fresh one by default) with every addon, configured from `proxies` (the
    `proxies:` entries of a quotas.yaml, provider `mock` of `kind` at a made-up address)."""
    monkeypatch.setenv("TOKENGATE_TEST_PROVIDER_KEY", PROVIDER_KEY)
    quotas = write_quotas(
        folder / "quotas.yaml", "http://upstream.test:8000", proxies, f"    kind: {kind}\n"
    )
    gate = gate or Gate()
    addons = pipeline.build(gate)
    with taddons.context(*addons) as tctx:
        tctx.configure(addons[0], tokengate_config=str(quotas))
        yield tctx, gate, addons


def reverse_flow(path="/p/chat/completions", key=ALICE, body=None):
    flow = tflow.tflow()
    flow.client_conn.proxy_mode = ProxyMode.parse("reverse:http://upstream.test:8000")
    flow.request.method = "POST"
    flow.request.path = path
    if key:
        flow.request.headers["authorization"] = f"Bearer {key}"
    payload = body or {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello!"}]}
    flow.request.content = json.dumps(payload).encode()
    return flow


async def _call(addon, hook, flow):
    result = getattr(addon, hook)(flow)
    if hasattr(result, "__await__"):
        await result


async def through(addons, hooks, flow):
    for hook in hooks:
        for addon in addons:
            if hasattr(addon, hook):
                await _call(addon, hook, flow)


def nested_in_content(depth: int) -> str:
    content = "[" * depth + '"hi"' + "]" * depth
    return '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": ' + content + "}]}"
