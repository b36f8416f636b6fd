"""A whole TokenGate pipeline inside mitmproxy's test harness (`taddons`), for addon tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy.test import taddons
from tokengate_core import pipeline
from tokengate_core.gate import Gate

from tests.e2e import PROVIDER_KEY, write_quotas

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
    folder: Path, monkeypatch: pytest.MonkeyPatch, proxies: str, gate: Gate | None = None
) -> Iterator[tuple[taddons.context, Gate, list]]:
    """`gate` (a fresh one by default) with every addon, configured from `proxies` (the
    `proxies:` entries of a quotas.yaml, provider `mock` at a made-up address)."""
    monkeypatch.setenv("TOKENGATE_TEST_PROVIDER_KEY", PROVIDER_KEY)
    quotas = write_quotas(folder / "quotas.yaml", "http://upstream.test:8000", proxies)
    gate = gate or Gate()
    addons = pipeline.build(gate)
    with taddons.context(*addons) as tctx:
        tctx.configure(addons[0], tokengate_config=str(quotas))
        yield tctx, gate, addons
