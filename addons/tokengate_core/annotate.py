"""A comment on every governed flow (shown in mitmweb) and a marker on the gate's refusals."""

from __future__ import annotations

from mitmproxy import http

from .config import plural
from .limiter import BUDGET
from .notes import Notes
from .prices import usd_text

MARKERS = {401: ":lock:", 429: ":no_entry:"}
REFUSAL_MARKER = ":warning:"  # the gate's other refusals: 400, 403, 413, 503


def comment(state: Notes, status: int | None) -> str:
    """`tokengate: p/alice gpt-4o 129 tokens (reported), $0.000645; left: total_tokens-1m 0,
    usd-1d $4.999355` (the cost and budgets where the call was priced)."""
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
        if "cost_micro_usd" in state:
            head += f", {usd_text(state['cost_micro_usd'])}"
    elif status is None:
        head = f"tokengate: {who} error, nothing charged"
    else:
        head = f"tokengate: {who} no charge (status {status})"
    if state.get("scrubbed"):
        head += " (provider key scrubbed from the answer)"
    remaining = state.get("remaining")
    if not remaining:
        return head
    return (
        head
        + "; left: "
        + ", ".join(
            f"{name} {usd_text(left) if name.startswith(f'{BUDGET}-') else left}"
            for name, left in remaining.items()
        )
    )


def annotate(flow: http.HTTPFlow, notes: Notes, status: int | None) -> None:
    """The flow's comment (`status` None: it ended without an answer), and a marker on the
    gate's own refusals."""
    answered = notes.get("answered_by_gate")
    if answered and answered >= 400 and status is not None:
        flow.marked = MARKERS.get(answered, REFUSAL_MARKER)
    flow.comment = comment(notes, status)
