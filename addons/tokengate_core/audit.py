"""The audit ledger: one JSON line per governed request, for reports and for QA replay.

A line names the caller by key *name* only and holds no header or body, so no secret can reach
it. Lines are written by a background thread (a hook only queues a string), in batches, and the
file is rotated by size to `ledger.jsonl.1`, `.2`, … (`.1` the newest).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from mitmproxy import http

from .notes import Notes
from .prices import usd

log = logging.getLogger("tokengate")

AUTO = "auto"  # the ledger option's default: .state/ledger.jsonl beside the quotas file
# The answers the gate makes itself, by status, as the ledger's `decision` names them.
GATE_DECISIONS = {
    200: "answered",
    400: "invalid",
    401: "unauthorized",
    403: "forbidden",
    404: "unknown_context",
    413: "too_large",
    429: "refused",
    500: "gate_error",  # an unexpected error while admitting: answered, never forwarded
    503: "unavailable",
}
BATCH_LINES = 1000  # lines written per write() call at most
# After the first line of a batch arrives, the writer waits this long for more before writing:
# one wake-up and one write per interval under load, rather than per request (each wake-up
# takes the GIL from the event loop).
BATCH_SECONDS = 0.05
# One encoder for every line: json.dumps with options builds a new encoder per call.
LINE_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# Lines waiting for the disk at most (some 20 MB): beyond, they are dropped and counted.
MAX_QUEUED_LINES = 50_000


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


def entry(flow: http.HTTPFlow, state: Notes, status: int | None, decision: str) -> dict[str, Any]:
    """The ledger line of one governed flow, from the notes the addons left in `state`.

    Only the flow's own timestamps are read (no wall clock), so replaying a capture gives the
    same lines every time.
    """
    usage = state.get("usage") or {}
    reserved = state.get("reserved")
    line = {
        "time": iso_time(flow.request.timestamp_start),
        "proxy": state.get("proxy"),
        "key": state.get("key"),
        "key_fp": state.get("key_fp"),  # which secret of that name: its SHA-256's first 16 digits
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
        "cached_prompt_tokens": usage.get("cached_prompt_tokens", 0),
        "cache_write_tokens": usage.get("cache_write_tokens", 0),
        "reasoning_tokens": usage.get("reasoning_tokens", 0),
        "usage_source": usage.get("source"),
        "latency_ms": _latency_ms(flow),
        "remaining": state.get("remaining", {}),
        "limits": state.get("limits", {}),
    }
    if "service_tier" in usage:  # the answer named the tier it was served (and billed) at
        line["service_tier"] = usage["service_tier"]
    if "cost_micro_usd" in state:  # the gate priced the call (a proxy with a budget)
        line["cost_usd"] = usd(state["cost_micro_usd"])
    if "max_tokens_lowered_to" in state:  # the completion was bounded by what was left
        line["max_tokens_lowered_to"] = state["max_tokens_lowered_to"]
    if state.get("scrubbed"):  # a provider key was scrubbed from the answer (never the key)
        line["scrubbed"] = True
    return line


def live_entry(flow: http.HTTPFlow, state: Notes) -> dict[str, Any]:
    answered = state.get("answered_by_gate")
    if flow.response is None:  # no answer at all: provider unreachable, or the caller gone
        return entry(flow, state, None, decision_of(answered) if answered else "error")
    return entry(flow, state, flow.response.status_code, decision_of(answered))


class LedgerWriter:
    """Appends lines from a queue on its own thread, rotating the file by size.

    It outlives a file it cannot write (disk full, folder removed): lines are dropped and
    counted meanwhile, every batch tries the file again, and the log says once that writing
    stopped and once that it resumed, with the number of lines lost. The queue is bounded, so a
    disk that stalls cannot make it grow without limit: beyond the cap, lines are dropped and
    counted the same way.
    """

    def __init__(
        self, path: Path, max_size: int, keep: int, max_queued: int = MAX_QUEUED_LINES
    ) -> None:
        self.path = path
        self.max_size = max_size
        self.keep = keep
        self._queue: queue.Queue[str | None] = queue.Queue(max_queued)
        self._dropped = 0  # lines lost since the last successful write
        self.lost = 0  # lines lost since the writer started (the metrics count them)
        self._dropped_lock = threading.Lock()
        self._failing = False  # the last write failed (the writer thread's own state)
        self._handle: BinaryIO | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the open file
        self._size = 0
        self._thread = threading.Thread(target=self._run, name="tokengate-ledger", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Lines lost since the last successful write (0 while all is well)."""
        return self._dropped

    def write(self, line: dict[str, Any]) -> None:
        text = LINE_ENCODER.encode(line) + "\n"
        try:
            self._queue.put_nowait(text)
        except queue.Full:
            if self._lose(1) == 1:
                log.error(
                    "tokengate: ledger %s: %d lines wait to be written, the disk is not keeping "
                    "up; dropping lines until it does",
                    self.path,
                    self._queue.maxsize,
                )

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.error("tokengate: ledger %s: stuck; queued lines are not written", self.path)
            return
        self._thread.join(timeout)

    def _lose(self, lines: int) -> int:
        with self._dropped_lock:
            self._dropped += lines
            self.lost += lines
            return self._dropped

    def _run(self) -> None:
        try:
            try:
                self._ensure_open()  # at once, so a file that cannot be opened shows at start
            except OSError as e:
                self._failed(e, [])
            while True:
                batch, stop = self._next_batch()
                if batch:
                    self._append(batch)
                if stop:
                    break
        finally:
            self._close_file()
        if self._dropped:
            log.error("tokengate: ledger %s: %d line(s) were not written", self.path, self._dropped)

    def _append(self, batch: list[str]) -> None:
        data = "".join(batch).encode()
        try:
            self._ensure_open()
            if self._size and self._size + len(data) > self.max_size:
                self._close_file()
                self._rotate()
                self._ensure_open()
            self._handle.write(data)
            self._handle.flush()
        except OSError as e:
            self._failed(e, batch)
            return
        self._size += len(data)
        if self._queue.qsize() > self._queue.maxsize // 2:
            return  # still far behind: the lines lost are told once the backlog is down
        with self._dropped_lock:
            dropped, self._dropped = self._dropped, 0
        if self._failing or dropped:
            log.warning(
                "tokengate: ledger %s is written again; %d line(s) were dropped meanwhile",
                self.path,
                dropped,
            )
        self._failing = False

    def _failed(self, error: OSError, batch: list[str]) -> None:
        self._close_file()
        self._lose(len(batch))
        if not self._failing:
            self._failing = True
            log.error(
                "tokengate: ledger %s: %s; dropping lines until it can be written again",
                self.path,
                error,
            )

    def _ensure_open(self) -> None:
        """Open the file, again if it was removed or replaced since (folder removed, rotated by
        another tool): writing on would go to a file nobody can read any more."""
        if self._handle is not None and self._identity == _identity(self.path):
            return
        self._close_file()
        handle = self.path.open("ab")
        stat = os.fstat(handle.fileno())
        self._handle, self._identity, self._size = handle, (stat.st_dev, stat.st_ino), stat.st_size
        if self._size and _torn(self.path):
            # A line cut short (a crash, a full disk) ends here: start on a line of our own.
            handle.write(b"\n")
            self._size += 1

    def _close_file(self) -> None:
        handle, self._handle, self._identity = self._handle, None, None
        if handle is not None:
            # What it still held cannot be written: those lines are counted already.
            with contextlib.suppress(OSError):
                handle.close()

    def _next_batch(self) -> tuple[list[str], bool]:
        batch: list[str] = []
        item = self._queue.get()
        if item is not None:
            time.sleep(BATCH_SECONDS)  # let the batch fill
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


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _torn(path: Path) -> bool:
    """Whether the non-empty file at `path` ends in the middle of a line."""
    with path.open("rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) != b"\n"


def ledger_path(option: str, quotas_path: str) -> Path | None:
    if option == "":
        return None
    if option == AUTO:
        return Path(quotas_path).parent / ".state" / "ledger.jsonl"
    return Path(option)
