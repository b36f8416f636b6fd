"""A comment on every governed flow (shown in mitmweb) and a marker on the gate's refusals."""

from __future__ import annotations

from mitmproxy import http

from . import flowstate
from .config import plural

MARKERS = {401: ":lock:", 429: ":no_entry:"}
REFUSAL_MARKER = ":warning:"  # the gate's other refusals: 400, 403, 413, 503


def comment(state: dict, status: int | None) -> str:
    """`tokengate: p/alice gpt-4o 129 tokens (reported); left: total_tokens-1m 0`."""
    who = f"{state.get('proxy', '?')}/{state.get('key', '?')}"
    answered = state.get("answered_by_gate")
    usage = state.get("usage")
    if answered and answered < 400:
        head = f"tokengate answered {state.get('endpoint')}: {who}"
    elif answered:
        refused = f" by {state['refused_by']}" if state.get("refused_by") else ""
        head = f"tokengate {answered}{refused}: {who}"
    elif usage:
        model = f" {state['model']}" if state.get("model") else ""
        head = (
            f"tokengate: {who}{model} {plural(usage['total_tokens'], 'token')} ({usage['source']})"
        )
    elif status is None:
        head = f"tokengate: {who} error, nothing charged"
    else:
        head = f"tokengate: {who} no charge (status {status})"
    remaining = state.get("remaining")
    if not remaining:
        return head
    return head + "; left: " + ", ".join(f"{name} {left}" for name, left in remaining.items())


class Annotator:
    def response(self, flow: http.HTTPFlow) -> None:
        state = flowstate.governed(flow)
        if state is None or flow.response is None:
            return
        answered = state.get("answered_by_gate")
        if answered and answered >= 400:
            flow.marked = MARKERS.get(answered, REFUSAL_MARKER)
        flow.comment = comment(state, flow.response.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        state = flowstate.governed(flow)
        if state is not None:
            flow.comment = comment(state, None)
