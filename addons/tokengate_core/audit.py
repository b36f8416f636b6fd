"""The audit ledger: one JSON line per governed request, for reports and for QA replay.

A line names the caller by key *name* only and holds no header or body, so no secret can reach
it. Lines are written by a background thread (a hook only queues a string), in batches, and the
file is rotated by size to `ledger.jsonl.1`, `.2`, … (`.1` the newest).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http

from . import flowstate
from .settings import Gate, size_option

log = logging.getLogger("tokengate")

AUTO = "auto"  # the ledger option's default: .state/ledger.jsonl beside the quotas file
# The answers the gate makes itself, by status, as the ledger's `decision` names them.
GATE_DECISIONS = {
    200: "answered",
    400: "invalid",
    401: "unauthorized",
    403: "forbidden",
    413: "too_large",
    429: "refused",
    503: "unavailable",
}
BATCH_LINES = 1000  # lines written per write() call at most


def iso_time(timestamp: float) -> str:
    """ISO 8601 UTC with milliseconds: 2026-11-29T14:03:07.123Z."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def decision_of(gate_status: int | None) -> str:
    if not gate_status:
        return "admitted"
    return GATE_DECISIONS.get(gate_status, "answered")


def _latency_ms(flow: http.HTTPFlow) -> float | None:
    start = flow.request.timestamp_start
    if flow.response is not None:
        end = flow.response.timestamp_end or flow.response.timestamp_start
    elif flow.error is not None:
        end = flow.error.timestamp
    else:
        return None
    return round(max(0.0, end - start) * 1000, 1)


def entry(
    flow: http.HTTPFlow, state: dict[str, Any], status: int | None, decision: str
) -> dict[str, Any]:
    """The ledger line of one governed flow, from the notes the addons left in `state`.

    Only the flow's own timestamps are read (no wall clock), so replaying a capture gives the
    same lines every time.
    """
    usage = state.get("usage") or {}
    reserved = state.get("reserved")
    return {
        "time": iso_time(flow.request.timestamp_start),
        "proxy": state.get("proxy"),
        "key": state.get("key"),
        "model": state.get("model"),
        "endpoint": state.get("endpoint"),
        "stream": bool(state.get("stream")),
        "status": status,
        "decision": decision,
        "limit": state.get("refused_by"),
        "reserved": sum(reserved.values()) if reserved else 0,
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "total_tokens": usage.get("total_tokens", 0),
        "usage_source": usage.get("source"),
        "latency_ms": _latency_ms(flow),
        "remaining": state.get("remaining", {}),
        "limits": state.get("limits", {}),
    }


def live_entry(flow: http.HTTPFlow, state: dict[str, Any]) -> dict[str, Any]:
    answered = state.get("answered_by_gate")
    if flow.response is None:  # no answer at all: provider unreachable, or the caller gone
        return entry(flow, state, None, decision_of(answered) if answered else "error")
    return entry(flow, state, flow.response.status_code, decision_of(answered))


class LedgerWriter:
    """Appends lines from a queue on its own thread, rotating the file by size."""

    def __init__(self, path: Path, max_size: int, keep: int) -> None:
        self.path = path
        self.max_size = max_size
        self.keep = keep
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="tokengate-ledger", daemon=True)
        self._thread.start()

    def write(self, line: dict[str, Any]) -> None:
        self._queue.put(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        handle = None
        try:
            handle = self.path.open("ab")
            while True:
                batch, stop = self._next_batch()
                data = "".join(batch).encode()
                if data and handle.tell() and handle.tell() + len(data) > self.max_size:
                    handle.close()
                    self._rotate()
                    handle = self.path.open("ab")
                handle.write(data)
                handle.flush()
                if stop:
                    return
        except OSError as e:
            log.error("tokengate: ledger %s: %s; no more lines are written", self.path, e)
        finally:
            if handle is not None:
                handle.close()

    def _next_batch(self) -> tuple[list[str], bool]:
        batch: list[str] = []
        item = self._queue.get()
        while item is not None:
            batch.append(item)
            if len(batch) >= BATCH_LINES:
                return batch, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, False
        return batch, True

    def _rotate(self) -> None:
        """ledger.jsonl -> .1 -> .2 …; what falls past `keep` is deleted."""
        names = [self.path]
        names += [self.path.with_name(f"{self.path.name}.{n}") for n in range(1, self.keep + 1)]
        names[-1].unlink(missing_ok=True)
        for index in range(len(names) - 2, -1, -1):
            if names[index].exists():
                names[index].replace(names[index + 1])


def ledger_path(option: str, quotas_path: str) -> Path | None:
    if option == "":
        return None
    if option == AUTO:
        return Path(quotas_path).parent / ".state" / "ledger.jsonl"
    return Path(option)


class Ledger:
    """Declares the ledger options and writes a line for every governed flow that ends."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.writer: LedgerWriter | None = None
        self._running = False

    def running(self) -> None:
        self._running = True

    def load(self, loader) -> None:
        loader.add_option(
            "tokengate_ledger",
            str,
            AUTO,
            "Audit ledger (JSON Lines) of governed requests; 'auto': .state/ledger.jsonl in the "
            "quotas file's folder; empty: off.",
        )
        loader.add_option(
            "tokengate_ledger_max_size",
            str,
            "64m",
            "Size at which the ledger is rotated to ledger.jsonl.1 (e.g. 512k, 64m).",
        )
        loader.add_option(
            "tokengate_ledger_keep", int, 5, "Rotated ledger files kept (.1 is the newest)."
        )

    def configure(self, updated: set[str]) -> None:
        options = {"tokengate_ledger", "tokengate_ledger_max_size", "tokengate_ledger_keep"}
        if not updated & (options | {"tokengate_config"}):
            return
        try:
            self._reopen()
        except exceptions.OptionsError as e:
            if self._running:
                raise
            # At start-up, one clear line (mitmdump then exits with status 1), as for quotas.yaml.
            log.error("tokengate: refusing to start: %s", e)

    def _reopen(self) -> None:
        """A new writer when the ledger's path, size or rotations changed."""
        max_size = size_option("tokengate_ledger_max_size")
        if ctx.options.tokengate_ledger_keep < 0:
            raise exceptions.OptionsError("tokengate_ledger_keep must be 0 or more")
        path = ledger_path(ctx.options.tokengate_ledger, ctx.options.tokengate_config)
        current = self.writer
        if current and (current.path, current.max_size, current.keep) == (
            path,
            max_size,
            ctx.options.tokengate_ledger_keep,
        ):
            return
        self.done()
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                message = f"tokengate_ledger: cannot create {path.parent}: {e}"
                raise exceptions.OptionsError(message) from e
            self.writer = LedgerWriter(path, max_size, ctx.options.tokengate_ledger_keep)

    def write(self, line: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write(line)

    def _record(self, flow: http.HTTPFlow) -> None:
        # Once per flow: a stream the caller cuts short may end in `error` after `response`.
        state = flowstate.governed(flow)
        if state is not None and not state.get("audited"):
            state["audited"] = True
            self.write(live_entry(flow, state))

    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def done(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
