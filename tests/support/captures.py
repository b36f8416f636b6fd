"""A capture made by `tokengate-capture` (the e2e `captured` fixture): what it holds, and its
replay."""

from __future__ import annotations

import json
import subprocess

from mitmproxy import io
from tokengate_core.tools.capture import Capture

from tests.support.processes import MITMDUMP, ROOT

# The statuses of the capture's flows, in order.
CAPTURED = [200, 429, 401, 200, 200, 200, 500, 200]


def ledger(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def secrets_of(made: Capture) -> list[bytes]:
    return [made.provider_key.encode(), *(key.encode() for key in made.caller_keys.values())]


def read_flows(path) -> list:
    with path.open("rb") as handle:
        return list(io.FlowReader(handle).stream())


def replay(made: Capture, ledger_path, *args: str, quotas=None) -> subprocess.CompletedProcess:
    """`mitmdump -nr capture.flows` with TokenGate, writing its ledger to `ledger_path`."""
    argv = [str(MITMDUMP), "-nr", str(made.flows), "-s", "addons/tokengate.py"]
    argv += ["--set", f"tokengate_config={quotas or made.quotas}"]
    argv += ["--set", f"tokengate_ledger={ledger_path}", *args]
    return subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, text=True, timeout=60)
