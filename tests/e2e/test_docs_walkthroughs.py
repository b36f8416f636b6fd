"""The walkthroughs of README.md and docs/, run as shown: the commands come from the documents
themselves (the blocks marked `run-by` with these tests' names), only the ports are free ones."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from tests.support.docblocks import (
    ROOT,
    Terminal,
    blocks_for,
    free_port,
    reader_env,
    run_block,
    run_console,
    tool_folder,
    with_ports,
)
from tests.support.npm import npm_environment, with_npm
from tests.support.processes import Gateway, Mock, self_signed
from tests.support.quotas import key_entries
from tests.support.redirect import to_the_mock

HERE = Path(__file__).resolve().relative_to(ROOT).as_posix()
LISTENING = r"listening at \S*:(\d+)"
# Claude Code calls home for telemetry and updates; the walkthrough needs none of it.
QUIET_CLAUDE = {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1"}
CLAUDE_CODE_KEY = "tg-claude-code-walkthrough-key"


def run_by(test: str):
    return blocks_for(f"{HERE}::{test}")


@pytest.fixture
def reader(tmp_path):
    """A reader's shell: a working folder, the console scripts on the PATH, a home of its own."""
    folder = tmp_path / "work"
    folder.mkdir()
    (tmp_path / "home").mkdir()
    env = reader_env(tool_folder(tmp_path / "bin"), tmp_path / "home")
    return folder, env


@pytest.fixture
def terminals():
    started: list[Terminal] = []
    yield started
    for terminal in reversed(started):
        terminal.stop()


def test_readme_walkthrough(reader, terminals):
    """The 200 -> 429 -> 401 of the README, against what scripts/demo.sh starts."""
    (walkthrough,) = run_by("test_readme_walkthrough")
    demo = (ROOT / "scripts" / "demo.sh").read_text(encoding="utf-8")
    assert "TOKENGATE_PORT:-8080" in demo and "MOCK_PORT=4010" in demo  # the ports it shows
    folder, env = reader
    gate_port, mock_port = free_port(), free_port()
    quotas = (ROOT / "quotas.yaml").read_text(encoding="utf-8")
    (folder / "quotas.yaml").write_text(with_ports(quotas, {4010: mock_port}), encoding="utf-8")
    env = {**env, "TOKENGATE_MOCK_PROVIDER_KEY": "sk-mock-provider-key"}
    mock = [sys.executable, str(ROOT / "scripts" / "mock_openai.py"), "--port", str(mock_port)]
    gate = [
        str(Path(sys.executable).with_name("mitmdump")),
        "--listen-host", "127.0.0.1", "-p", str(gate_port),
        "--mode", f"reverse:http://127.0.0.1:{mock_port}",
        "-s", str(ROOT / "addons" / "tokengate.py"),
        "--set", f"tokengate_config={folder / 'quotas.yaml'}",
    ]  # fmt: skip
    for argv in (mock, gate):
        terminals.append(Terminal(shlex.join(argv), folder, env))
        terminals[-1].wait_for(LISTENING)
    run_console(walkthrough, folder, env, {8080: gate_port, 4010: mock_port})


def test_keys_walkthrough(reader):
    """The key commands of the README, on a copy of the default quotas.yaml."""
    (block,) = run_by("test_keys_walkthrough")
    folder, env = reader
    quotas = folder / "quotas.yaml"
    quotas.write_text((ROOT / "quotas.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    run = run_block(block.text, folder, env, timeout=60)
    assert run.returncode == 0, run
    assert "tg-" in run.stdout
    written = quotas.read_text(encoding="utf-8")
    assert "my-app.rotated-" in written
    assert "# revoked my-app" in written


def test_regular_mode_walkthrough(reader, terminals):
    """docs/regular-mode.md: the mock over HTTPS, the gate as HTTPS_PROXY, curl trusting the CA."""
    provider, gateway, app = run_by("test_regular_mode_walkthrough")
    folder, env = reader
    (folder / "addons").symlink_to(ROOT / "addons")
    ports = {4443: free_port(), 8080: free_port()}
    for block in (provider, gateway):
        terminals.append(Terminal(with_ports(block.text, ports), folder, env))
        terminals[-1].wait_for(LISTENING)
    run_console(app, folder, env, ports)


def test_replay_walkthrough(reader):
    """docs/replay.md: a capture made with the mock, replayed with -nr, its ledger reported."""
    (block,) = run_by("test_replay_walkthrough")
    folder, env = reader
    (folder / "addons").symlink_to(ROOT / "addons")
    run = run_block(block.text, folder, env, timeout=120)
    assert run.returncode == 0, run
    replayed = [json.loads(line) for line in (folder / "replay.jsonl").read_text().splitlines()]
    assert replayed and all(line["replay"] for line in replayed)
    assert re.search(r"^qa +alice +gpt-4o-mini +2 ", run.stdout, re.MULTILINE), run.stdout


@pytest.fixture(scope="module")
def npm_env():
    """npm installing globally into the cache folder (Claude Code: ~250 MB), quietly."""
    return {**npm_environment("Claude Code"), **QUIET_CLAUDE}


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
    """The regular-mode commands: Claude Code on Anthropic's own URL through HTTPS_PROXY, the
    gate's upstream connection to api.anthropic.com sent to the mock."""
    (block,) = run_by("test_claude_code_regular_mode")
    folder, env = reader
    if shutil.which("claude", path=npm_env["PATH"]) is None:
        installed = run_block(
            "npm install -g @anthropic-ai/claude-code", folder, with_npm(env, npm_env), 600
        )
        assert installed.returncode == 0, installed
    mock = Mock.start("--tls-cert", str(self_signed(tmp_path)))
    config = tmp_path / "quotas.yaml"
    config.write_text(
        "providers:\n  anthropic:\n    kind: anthropic\n"
        "    base_url: https://api.anthropic.com\n    api_key_env: TOKENGATE_TEST_PROVIDER_KEY\n"
        "    hosts: [api.anthropic.com]\nproxies:\n  claude-code:\n    context: /claude-code\n"
        "    provider: anthropic\n    token_limits:\n      total_tokens:\n"
        "        - {count: 1000000, duration: 1h}\n    keys:\n"
        + key_entries(laptop=CLAUDE_CODE_KEY),
        encoding="utf-8",
    )
    gate = Gateway.start(
        config, "regular", "-s", str(to_the_mock(tmp_path, "api.anthropic.com", mock.url)),
        "--set", f"confdir={Path(env['HOME']) / '.mitmproxy'}",
        "--set", "ssl_insecure=true",  # the mock's own certificate, not api.anthropic.com's
    )  # fmt: skip
    try:
        (folder / "claude-code.key").write_text(CLAUDE_CODE_KEY + "\n", encoding="utf-8")
        env = {k: v for k, v in with_npm(env, npm_env).items() if k != "ANTHROPIC_BASE_URL"}
        run_console(block, folder, env, {8080: gate.port})
        stats = mock.stats()
        assert stats["by_endpoint"].get("messages", 0) >= 1 and stats["unauthorized"] == 0
        assert stats["last_request"]["headers"]["Host"] == "api.anthropic.com"
    finally:
        gate.stop()
        mock.process.stop()
