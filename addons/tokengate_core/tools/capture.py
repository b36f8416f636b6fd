"""Make a small capture of governed traffic for QA replay and its tests.

Starts the mock provider and TokenGate (saving flows with `-w`, streamed bodies included), sends
a fixed set of calls (admitted, refused by quota, without a key, a stream, the model list, an
embedding, a provider error, a usage query) and stops. Writes into FOLDER:

  quotas.yaml     the quotas the capture was made with (proxy `qa`, keys `alice` and `bob`)
  provider.key    a throwaway key for the mock provider (quotas.yaml reads it)
  capture.flows   the saved flows, as `mitmdump -w` wrote them
  .state/ledger.jsonl  the gate's own ledger of the run

Caller keys are random and never written; only their hashes are, in quotas.yaml.

    tokengate-capture FOLDER
    mitmdump -nr FOLDER/capture.flows -s addons/tokengate.py \\
        --set tokengate_config=FOLDER/quotas.yaml --set tokengate_ledger=replay.jsonl
"""

from __future__ import annotations

import argparse
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tokengate_core.keys import generate_key, hash_key

from .children import ADDON, MOCK, Child

MITMDUMP = Path(sys.executable).with_name("mitmdump")
STARTUP_TIMEOUT = 30.0
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}
STREAM = {**CHAT, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
EMBED = {"model": "text-embedding-3-small", "input": "Hello!"}


def write_quotas(folder: Path, mock_url: str, keys: dict[str, str]) -> Path:
    entries = "".join(f'      {name}: {{sha256: "{hash_key(k)}"}}\n' for name, k in keys.items())
    path = folder / "quotas.yaml"
    path.write_text(
        "providers:\n"
        "  mock:\n"
        f"    base_url: {mock_url}/v1\n"
        "    api_key_file: provider.key\n"
        "    hosts: [127.0.0.1]\n"
        "proxies:\n"
        "  qa:\n"
        "    context: /qa\n"
        "    provider: mock\n"
        "    token_limits:\n"
        "      total_tokens:\n"
        "        - {count: 100, duration: 1m}\n"
        "    keys:\n" + entries,
        encoding="utf-8",
    )
    return path


def calls(keys: dict[str, str]) -> list[tuple[str, str, str | None, dict | None, dict[str, str]]]:
    """(method, path below /qa, caller key, JSON body, extra headers), in the order sent."""
    alice, bob = keys["alice"], keys["bob"]
    return [
        ("POST", "/chat/completions", alice, CHAT, {}),  # 200, spends alice's 100
        ("POST", "/chat/completions", alice, CHAT, {}),  # 429 from the gate
        ("POST", "/chat/completions", None, CHAT, {}),  # 401 from the gate
        ("POST", "/chat/completions", bob, STREAM, {}),  # 200, SSE with usage
        ("GET", "/models", bob, None, {}),  # 200, not metered
        ("POST", "/embeddings", bob, EMBED, {}),  # 200
        ("POST", "/chat/completions", bob, CHAT, {"X-Mock-Mode": "error:500"}),  # provider 500
        ("GET", "/tokengate/usage", bob, None, {}),  # 200 from the gate
    ]


@dataclass
class Capture:
    folder: Path
    statuses: list[int]  # what each call got, in order
    provider_key: str = field(repr=False)  # for tests that prove no secret was saved
    caller_keys: dict[str, str] = field(repr=False)

    @property
    def flows(self) -> Path:
        return self.folder / "capture.flows"

    @property
    def quotas(self) -> Path:
        return self.folder / "quotas.yaml"

    @property
    def ledger(self) -> Path:
        return self.folder / ".state" / "ledger.jsonl"


def started(child: Child, what: str) -> str:
    match = child.wait_ready(STARTUP_TIMEOUT)
    if match is None:
        child.stop()
        raise RuntimeError(f"{what} did not start:\n{child.output}")
    return f"http://127.0.0.1:{match.group(1)}"


def capture(folder: Path) -> Capture:
    """Make the capture in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    provider_key = "sk-mock-" + secrets.token_hex(16)
    (folder / "provider.key").write_text(provider_key + "\n", encoding="utf-8")
    keys = {"alice": generate_key(), "bob": generate_key()}
    mock = Child([*MOCK, "--expect-key", provider_key])
    try:
        mock_url = started(mock, "mock provider")
        config = write_quotas(folder, mock_url, keys)
        argv = [str(MITMDUMP), "--listen-host", "127.0.0.1", "-p", "0"]
        argv += ["--mode", f"reverse:{mock_url}", "-s", str(ADDON)]
        argv += ["--set", f"tokengate_config={config}", "--set", "flow_detail=0"]
        argv += ["--set", "store_streamed_bodies=true", "-w", str(folder / "capture.flows")]
        gate = Child(argv)
        try:
            gate_url = started(gate, "mitmdump")
            statuses = []
            with httpx.Client(base_url=f"{gate_url}/qa", timeout=30) as client:
                for method, path, key, body, headers in calls(keys):
                    if key is not None:
                        headers = {**headers, "Authorization": f"Bearer {key}"}
                    answer = client.request(method, path, json=body, headers=headers)
                    statuses.append(answer.status_code)
        finally:
            gate.stop()
    finally:
        mock.stop()
    return Capture(folder, statuses, provider_key, keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokengate-capture", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where quotas.yaml and capture.flows go")
    args = parser.parse_args(argv)
    made = capture(args.folder.resolve())  # mitmdump runs from the repository
    print(f"capture: {len(made.statuses)} calls, statuses {made.statuses}")
    print(f"capture: {made.flows} (quotas: {made.quotas}, ledger: {made.ledger})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
