"""QA replay prices a call as live did: a stream whose usage the gate asked for (so the usage
chunk never reached the caller, nor the capture) is replayed with the figures noted live, its
cached and reasoning tokens included, and its ledger line costs what the live one did."""

from __future__ import annotations

import subprocess

import httpx

from tests.support.captures import ledger
from tests.support.processes import MITMDUMP, ROOT, Gateway, write_quotas
from tests.support.quotas import ALICE, key_entries

# Cached prompt tokens at a tenth of the input price: dropping them changes the cost.
PROXY = (
    "  p:\n    context: /p\n    provider: mock\n"
    "    budgets:\n      - {usd: 100, duration: 1h}\n"
    "    keys:\n" + key_entries(alice=ALICE) + "prices:\n"
    "  dear-model: {input: 1000, cached_input: 100, output: 5000}\n"
)
MESSAGES = [{"role": "user", "content": "Hello there, how are you today?"}]
SUB_COUNTS = {"X-Mock-Cached": "8", "X-Mock-Reasoning": "6"}


def test_a_replayed_stream_costs_what_it_cost_live(tmp_path, fresh_mock):
    quotas = write_quotas(tmp_path / "quotas.yaml", fresh_mock.url, PROXY)
    flows = tmp_path / "capture.flows"
    gateway = Gateway.start(
        quotas,
        f"reverse:{fresh_mock.url}",
        "--set", "store_streamed_bodies=true",
        "-w", str(flows),
    )  # fmt: skip
    try:
        headers = {"Authorization": f"Bearer {ALICE}", **SUB_COUNTS}
        for stream in (True, False):
            body = {"model": "dear-model", "messages": MESSAGES, "max_tokens": 10}
            answer = httpx.post(
                f"{gateway.url}/p/chat/completions",
                json={**body, "stream": stream},
                headers=headers,
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
    finally:
        gateway.stop()
    live = ledger(tmp_path / ".state" / "ledger.jsonl")
    assert [line["stream"] for line in live] == [True, False]
    streamed = live[0]
    assert (streamed["cached_prompt_tokens"], streamed["reasoning_tokens"]) == (8, 6)

    replayed_path = tmp_path / "replay.jsonl"
    argv = [str(MITMDUMP), "-nr", str(flows), "-s", "addons/tokengate.py"]
    argv += ["--set", f"tokengate_config={quotas}", "--set", f"tokengate_ledger={replayed_path}"]
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, timeout=60)
    replayed = ledger(replayed_path)
    fields = ("cost_usd", "cached_prompt_tokens", "reasoning_tokens", "usage_source")
    assert [{f: line.get(f) for f in fields} for line in replayed] == [
        {f: line.get(f) for f in fields} for line in live
    ]
