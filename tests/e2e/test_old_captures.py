"""Captures saved by an earlier TokenGate (its flow notes as they were then) still load, and QA
replay gives the decisions that version made live with the same quotas."""

from __future__ import annotations

import json
import shutil
import subprocess

from tests.support.processes import MITMDUMP, ROOT

CAPTURE = ROOT / "tests" / "data" / "capture-0.1"  # made with TokenGate 0.1's scripts/capture.py
# What a replay can reproduce of a live line (latency and the newer fields aside).
COMPARED = (
    "time", "proxy", "key", "model", "endpoint", "stream", "status", "decision", "limit",
    "reserved", "prompt_tokens", "completion_tokens", "total_tokens", "usage_source",
    "remaining", "limits",
)  # fmt: skip


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_capture_of_the_previous_version_replays_as_it_was_decided_live(tmp_path):
    # No provider key beside the quotas: a replay sends nothing and needs none.
    for name in ("capture.flows", "quotas.yaml"):
        shutil.copy(CAPTURE / name, tmp_path)
    replayed = tmp_path / "replay.jsonl"
    argv = [str(MITMDUMP), "-nr", str(tmp_path / "capture.flows"), "-s", "addons/tokengate.py"]
    argv += ["--set", f"tokengate_config={tmp_path / 'quotas.yaml'}"]
    argv += ["--set", f"tokengate_ledger={replayed}"]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    live = lines(CAPTURE / "live-ledger.jsonl")
    again = lines(replayed)
    assert len(again) == len(live) == 8
    assert all(line["replay"] is True for line in again)
    assert [{k: line[k] for k in COMPARED} for line in again] == [
        {k: line[k] for k in COMPARED} for line in live
    ]
