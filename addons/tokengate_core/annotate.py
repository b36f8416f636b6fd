"""A comment on every governed flow (shown in mitmweb) and a marker on the gate's own answers."""

from __future__ import annotations

from mitmproxy import http

from . import flowstate

MARKERS = {401: ":lock:", 429: ":no_entry:"}


class Annotator:
    def response(self, flow: http.HTTPFlow) -> None:
        state = flowstate.governed(flow)
        if state is None or flow.response is None:
            return
        who = _caller(state)
        answered = state.get("answered_by_gate")
        if answered:
            flow.marked = MARKERS.get(answered, ":warning:")
            refused = f" by {state['refused_by']}" if state.get("refused_by") else ""
            flow.comment = f"tokengate {answered}{refused}: {who}"
            return
        usage = state.get("usage")
        remaining = flow.response.headers.get("X-RateLimit-Remaining", "?")
        if usage:
            flow.comment = (
                f"tokengate: {who} {state.get('model') or ''} {usage['total_tokens']} tokens "
                f"({usage['source']}), {remaining} left"
            )
        else:
            flow.comment = f"tokengate: {who} no charge (status {flow.response.status_code})"

    def error(self, flow: http.HTTPFlow) -> None:
        state = flowstate.governed(flow)
        if state is not None:
            usage = state.get("usage")
            charged = usage["total_tokens"] if usage else 0
            flow.comment = f"tokengate: {_caller(state)} error, charged {charged} tokens"


def _caller(state: dict) -> str:
    return f"{state.get('proxy', '?')}/{state.get('key', '?')}"
