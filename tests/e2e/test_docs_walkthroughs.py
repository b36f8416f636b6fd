"""The walkthroughs of README.md and docs/, run as shown: the commands come from the documents
themselves (the blocks marked `run-by` with these tests' names), only the ports are free ones."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.docblocks import (
    ROOT,
    Terminal,
    blocks_for,
    free_port,
    reader_env,
    run_console,
    tool_folder,
    with_ports,
)

HERE = Path(__file__).resolve().relative_to(ROOT).as_posix()
LISTENING = r"listening at \S*:(\d+)"


def run_block(script: str, folder, env, timeout: float) -> subprocess.CompletedProcess:
    """A shell block of a document, run as a reader would paste it, failing on any error."""
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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
