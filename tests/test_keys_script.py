"""scripts/keys.py: a created key works, only its hash is written, and the file keeps its layout."""

from __future__ import annotations

import subprocess
import sys

import pytest
from tokengate_core.config import load_config

from tests.e2e import ROOT

QUOTAS = """\
# top comment
providers:
  mock:
    base_url: http://127.0.0.1:1/v1
    api_key_env: TOKENGATE_TEST_PROVIDER_KEY
proxies:
  with-keys:
    context: /a      # a comment that must survive
    provider: mock
    keys:
      old: {sha256: "%s"}
  without-keys:
    context: /b
    provider: mock
    token_limits:
      total_tokens:
        - {count: 10, duration: 1m}
  # trailing comment
""" % ("0" * 64)


def create(config, proxy, name):
    return subprocess.run(
        [sys.executable, "scripts/keys.py", "create", proxy, name, "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("proxy", ["with-keys", "without-keys"])
def test_created_key_authenticates_and_layout_survives(tmp_path, monkeypatch, proxy):
    monkeypatch.setenv("TOKENGATE_TEST_PROVIDER_KEY", "sk-x")
    config = tmp_path / "quotas.yaml"
    config.write_text(QUOTAS)
    result = create(config, proxy, "new-app")
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip().splitlines()[-1]
    assert secret.startswith("tg-") and len(secret) > 40
    text = config.read_text()
    assert secret not in text
    for line in QUOTAS.splitlines():  # every original line is still there, in order
        assert line in text
    loaded = load_config(config)
    found = loaded.proxies[proxy].keys.find(secret)
    assert found is not None and found.name == "new-app"
    other = "without-keys" if proxy == "with-keys" else "with-keys"
    assert loaded.proxies[other].keys.find(secret) is None


def test_refuses_duplicates_and_unknown_proxies(tmp_path):
    config = tmp_path / "quotas.yaml"
    config.write_text(QUOTAS)
    assert create(config, "with-keys", "old").returncode != 0
    missing = create(config, "nope", "x")
    assert missing.returncode != 0 and "no proxy 'nope'" in missing.stderr
    assert config.read_text() == QUOTAS
