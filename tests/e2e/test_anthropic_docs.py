"""docs/providers.md's Anthropic walkthrough, run as shown: Claude Code installed with npm (into a
cache folder kept between runs), then the mock speaking Anthropic, the gate in front of it, curl's
200 -> 429 -> 401 and `claude -p` through the gate, in reverse and in regular mode."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.e2e.test_docs_walkthroughs import LISTENING, reader, run_block, terminals
from tests.support.docblocks import (
    ROOT,
    Terminal,
    blocks_for,
    free_port,
    run_console,
    with_ports,
)
from tests.support.processes import Gateway, Mock, self_signed
from tests.support.quotas import key_entries

__all__ = ["reader", "terminals"]  # the fixtures, shared with the other walkthroughs

HERE = Path(__file__).resolve().relative_to(ROOT).as_posix()
# npm's global prefix and download cache for Claude Code, kept between runs (~250 MB).
NPM_FOLDER = Path(
    os.environ.get("TOKENGATE_NPM_CACHE", Path.home() / ".cache" / "tokengate-tests" / "npm")
)
# Claude Code calls home for telemetry and updates; the walkthrough needs none of it.
QUIET_CLAUDE = {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1"}
CLAUDE_CODE_KEY = "tg-claude-code-walkthrough-key"


def run_by(test: str):
    return blocks_for(f"{HERE}::{test}")


@pytest.fixture(scope="module")
def npm_env():
    """npm installing globally into the cache folder, its bin first on the PATH."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: Claude Code cannot be installed to run behind the gate")
    prefix = NPM_FOLDER / "prefix"
    return {
        "NPM_CONFIG_PREFIX": str(prefix),
        "npm_config_cache": str(NPM_FOLDER / "cache"),
        "npm_config_update_notifier": "false",
        "PATH": f"{prefix / 'bin'}{os.pathsep}{os.environ['PATH']}",
        **QUIET_CLAUDE,
    }


def with_npm(env: dict[str, str], npm_env: dict[str, str]) -> dict[str, str]:
    return {**env, **npm_env, "PATH": f"{npm_env['PATH']}{os.pathsep}{env['PATH']}"}


def test_claude_code_walkthrough(reader, terminals, npm_env):
    install, provider, gateway, calls, claude = run_by("test_claude_code_walkthrough")
    folder, env = reader
    env = with_npm(env, npm_env)
    installed = run_block(install.text, folder, env, timeout=600)
    assert installed.returncode == 0, installed
    (folder / "addons").symlink_to(ROOT / "addons")
    ports = {4010: free_port(), 8080: free_port()}
    for block in (provider, gateway):
        terminals.append(Terminal(with_ports(block.text, ports), folder, env))
        terminals[-1].wait_for(LISTENING)
    run_console(calls, folder, env, ports)
    run_console(claude, folder, env, ports)
    ledger = (folder / ".state" / "ledger.jsonl").read_text(encoding="utf-8")
    assert '"proxy":"claude-code","key":"laptop"' in ledger
    assert '"endpoint":"messages","stream":true,"status":200' in ledger


def test_claude_code_regular_mode(reader, npm_env, tmp_path):
    """The regular-mode commands, with the mock over HTTPS standing for api.anthropic.com (the
    test points ANTHROPIC_BASE_URL at it; Claude Code goes there through HTTPS_PROXY)."""
    (block,) = run_by("test_claude_code_regular_mode")
    folder, env = reader
    if shutil.which("claude", path=npm_env["PATH"]) is None:
        installed = run_block(
            "npm install -g @anthropic-ai/claude-code", folder, with_npm(env, npm_env), 600
        )
        assert installed.returncode == 0, installed
    pem = self_signed(tmp_path)
    mock = Mock.start("--tls-cert", str(pem))
    url = mock.url.replace("127.0.0.1", "localhost")
    config = tmp_path / "quotas.yaml"
    config.write_text(
        "providers:\n  anthropic:\n    kind: anthropic\n"
        f"    base_url: {url}\n    api_key_env: TOKENGATE_TEST_PROVIDER_KEY\n"
        "    hosts: [localhost]\nproxies:\n  claude-code:\n    context: /claude-code\n"
        "    provider: anthropic\n    token_limits:\n      total_tokens:\n"
        "        - {count: 1000000, duration: 1h}\n    keys:\n"
        + key_entries(laptop=CLAUDE_CODE_KEY),
        encoding="utf-8",
    )
    gate = Gateway.start(
        config, "regular",
        "--set", f"confdir={Path(env['HOME']) / '.mitmproxy'}",
        "--set", f"ssl_verify_upstream_trusted_ca={pem}",
    )  # fmt: skip
    try:
        (folder / "claude-code.key").write_text(CLAUDE_CODE_KEY + "\n", encoding="utf-8")
        env = {**with_npm(env, npm_env), "ANTHROPIC_BASE_URL": url}
        run_console(block, folder, env, {8080: gate.port})
        stats = mock.stats()
        assert stats["by_endpoint"].get("messages", 0) >= 1 and stats["unauthorized"] == 0
        assert "Streaming response" in gate.process.output  # the stream went through the gate
    finally:
        gate.stop()
        mock.process.stop()
