"""What the TokenGate addons tell each other about a flow, kept in `flow.metadata`.

Only plain values go there (mitmproxy saves metadata with the flow), never a secret.
"""

from __future__ import annotations

from typing import Any

from mitmproxy import http

META = "tokengate"


def governed(flow: http.HTTPFlow) -> dict[str, Any] | None:
    """The gate's notes on a flow it governs, or None for traffic that is not ours."""
    return flow.metadata.get(META)


def answer(flow: http.HTTPFlow, response: http.Response) -> None:
    """Answer the flow from the gate; upstream is never contacted for it."""
    flow.response = response
    flow.metadata[META]["answered_by_gate"] = response.status_code


def answered_by_gate(flow: http.HTTPFlow) -> bool:
    state = governed(flow)
    return bool(state and state.get("answered_by_gate"))
