"""QA replay (`mitmdump -nr`) sends nothing upstream: it runs without the provider's key or the
store's secrets, and its log names the store it really uses."""

from __future__ import annotations

import logging
import os
import subprocess

import pytest
from mitmproxy.addons.readfile import ReadFile
from mitmproxy.test import taddons
from tokengate_core import pipeline
from tokengate_core.gate import Gate
from tokengate_core.stores.memory import MemoryStore

from tests.support.captures import ledger
from tests.support.processes import MITMDUMP, ROOT, write_quotas
from tests.support.quotas import proxies

UNSET = "TOKENGATE_FIXES_UNSET_SECRET"  # a variable no environment sets


def replay_without_secrets(flows, quotas, ledger_path) -> subprocess.CompletedProcess:
    argv = [str(MITMDUMP), "-nr", str(flows), "-s", "addons/tokengate.py"]
    argv += ["--set", f"tokengate_config={quotas}", "--set", f"tokengate_ledger={ledger_path}"]
    env = {k: v for k, v in os.environ.items() if k != UNSET and "TOKENGATE" not in k}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "without",
    [
        ("    api_key_file: provider.key\n", "    api_key_file: provider.key\n"),  # no such file
        ("    api_key_file: provider.key\n", f"    api_key_env: {UNSET}\n"),
        ("proxies:\n", f"store: {{kind: redis, url_env: {UNSET}}}\nproxies:\n"),
    ],
    ids=["key-file-missing", "key-variable-unset", "redis-url-unset"],
)
def test_replay_runs_without_provider_credentials(captured, tmp_path, without):
    old, new = without
    quotas = tmp_path / "quotas.yaml"  # beside it no provider.key
    quotas.write_text(captured.quotas.read_text().replace(old, new), encoding="utf-8")
    out = tmp_path / "replay.jsonl"
    done = replay_without_secrets(captured.flows, quotas, out)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    replayed = ledger(out)
    assert all(line.pop("replay") is True for line in replayed)
    assert replayed == ledger(captured.ledger)  # the same decisions as live
    kind = "redis" if "redis" in new else "sqlite"
    assert f"; replay store memory (its own; the {kind} store is not used)" in log
    assert "; store " not in log and "connection_strategy" not in log
    assert not (tmp_path / ".state" / "tokengate.sqlite3").exists()  # the live store: untouched


@pytest.mark.parametrize(
    ("options", "replaying"),
    [
        ({}, False),  # a live gate
        ({"rfile": "capture.flows"}, False),  # `-r` beside a live proxy: it forwards
        ({"rfile": "capture.flows", "server": False}, True),  # `-nr`: replay alone
    ],
)
def test_only_a_replay_alone_does_without_the_provider_key(
    tmp_path, monkeypatch, caplog, options, replaying
):
    caplog.set_level(logging.INFO, logger="tokengate")
    monkeypatch.delenv("TOKENGATE_TEST_PROVIDER_KEY", raising=False)
    quotas = write_quotas(tmp_path / "quotas.yaml", "http://upstream.test:8000", proxies(100))
    gate = Gate()
    addons = pipeline.build(gate)
    with taddons.context(ReadFile(), *addons) as tctx:
        tctx.configure(addons[0], tokengate_config=str(quotas), **options)
        if replaying:
            assert gate.config is not None and gate.proxy("p").provider.api_key == ""
            assert isinstance(gate.store, MemoryStore)  # not the configured SQLite store
            assert "replay store memory (its own; the sqlite store is not used)" in caplog.text
        else:
            assert gate.config is None
            assert "TOKENGATE_TEST_PROVIDER_KEY is not set" in caplog.text
