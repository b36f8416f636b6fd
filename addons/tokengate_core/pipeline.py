"""The TokenGate addons in the order their hooks must run for each flow.

Seven addons, each one concern, grouped so that a flow pays for few dispatches:
- Settings: options, quotas.yaml (live reload), the operator's commands.
- CaptureReplay: flows read from a file (`-nr`); must see their saved notes before AdmissionControl
  drops them.
- AdmissionControl: route, key (401), endpoint (403), size (413), body (400), quota (429/503).
- Metering: settle what an admitted request cost, from its answer or stream.
- CredentialSwap: strip the caller's key, set the provider's (after AdmissionControl decided),
  redact it once the request has left, and scrub any provider key from the answer (after
  Metering has set its stream hook, which it wraps).
- Reporting: the ledger line and the flow's comment, once the flow ends (after Metering, and
  after CredentialSwap has noted a scrubbed answer).
- Metrics: Prometheus metrics of each flow, from the notes once every other addon has written
  them; its `request` hook, the last, marks when a request leaves for the provider.
"""

from __future__ import annotations

from .admission import AdmissionControl
from .credentials import CredentialSwap
from .gate import Gate
from .metering import Metering
from .metrics import Metrics
from .quota import QuotaService
from .replay import CaptureReplay
from .reporting import Reporting
from .settings import Settings


def build(gate: Gate) -> list:
    quota = QuotaService(gate)
    reporting = Reporting(gate)
    return [
        Settings(gate),
        CaptureReplay(gate, reporting),
        AdmissionControl(gate, quota),
        Metering(gate, quota),
        CredentialSwap(gate),
        reporting,
        Metrics(gate, quota, reporting),
    ]
