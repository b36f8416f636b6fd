"""Fixtures of the addon tests: gates inside mitmproxy's test harness."""

from __future__ import annotations

import pytest
from mitmproxy.test import taddons
from tokengate_core import pipeline
from tokengate_core.admission import AdmissionControl
from tokengate_core.gate import Gate
from tokengate_core.metering import Metering

from tests.support.harness import gate_in_harness
from tests.support.processes import PROVIDER_KEY, write_quotas
from tests.support.quotas import PROXIES, proxies


@pytest.fixture
def gate_addons(tmp_path, monkeypatch):
    with gate_in_harness(
        tmp_path, monkeypatch, PROXIES, Gate(clock=lambda: 1_000_000.0)
    ) as harnessed:
        yield harnessed


@pytest.fixture
def make_gate(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENGATE_TEST_PROVIDER_KEY", PROVIDER_KEY)
    contexts = []

    def make(count: int = 1000, extra: str = "", **options):
        folder = tmp_path / f"gate-{len(contexts)}"  # each gate its own store (SQLite file)
        folder.mkdir()
        quotas = write_quotas(
            folder / "quotas.yaml", "http://upstream.test:8000", proxies(count, extra)
        )
        gate = Gate()
        addons = pipeline.build(gate)
        context = taddons.context(*addons)
        tctx = context.__enter__()
        contexts.append(context)
        tctx.configure(addons[0], tokengate_config=str(quotas))
        (metering,) = [a for a in addons if isinstance(a, Metering)]
        if options:
            (admission,) = [a for a in addons if isinstance(a, AdmissionControl)]
            tctx.configure(admission, **options)
        return gate, addons, metering

    yield make
    for context in contexts:
        context.__exit__(None, None, None)
