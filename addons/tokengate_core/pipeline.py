"""The TokenGate addons in the order their hooks must run for each flow.

requestheaders: route, authenticate (401), refuse what callers may not do (403) and oversized
bodies (413), then swap credentials;
request: reserve (429) before the swapped-in key is redacted from flows the gate answered.
"""

from __future__ import annotations

from .admission import Authenticator, EndpointPolicy, Router
from .annotate import Annotator
from .commands import Commands
from .credentials import CredentialSwap
from .metering import Metering
from .settings import Gate, Settings


def build(gate: Gate) -> list:
    settings = Settings(gate)
    return [
        settings,
        Router(gate),
        Authenticator(gate),
        EndpointPolicy(),
        Metering(gate),
        CredentialSwap(gate),
        Annotator(),
        Commands(gate, settings),
    ]
