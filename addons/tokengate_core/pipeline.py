"""The TokenGate addons in the order their hooks must run for each flow.

requestheaders: route, authenticate (401), refuse what callers may not do (403) and oversized
bodies (413), then swap credentials;
request: reserve (429) before the swapped-in key is redacted from flows the gate answered.
response/error: settle, then the ledger line, then the comment.
Flows read from a file (`-nr`) are left to CaptureReplay, which must see their saved notes before
the Router drops them.
"""

from __future__ import annotations

from .admission import Authenticator, EndpointPolicy, Router
from .annotate import Annotator
from .audit import Ledger
from .commands import Commands
from .credentials import CredentialSwap
from .metering import Metering
from .replay import CaptureReplay
from .settings import Gate, Settings
from .standing import UsageQuery


def build(gate: Gate) -> list:
    settings = Settings(gate)
    ledger = Ledger(gate)
    return [
        settings,
        CaptureReplay(gate, ledger),
        Router(gate),
        Authenticator(gate),
        UsageQuery(gate),
        EndpointPolicy(),
        Metering(gate),
        ledger,
        CredentialSwap(gate),
        Annotator(),
        Commands(gate, settings),
    ]
