"""The Reporting addon: a ledger line and a comment for every governed flow, once it ends."""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import ctx, exceptions, http

from . import notes
from .annotate import annotate
from .audit import AUTO, LedgerWriter, ledger_path, live_entry
from .gate import Gate
from .settings import size_option

log = logging.getLogger("tokengate")


class Reporting:
    """Declares the ledger options; for every governed flow that ends, writes its ledger line
    and its comment (mitmweb shows it), and marks the gate's refusals."""

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

    def _record(self, flow: http.HTTPFlow, status: int | None) -> None:
        # Once per flow: a stream the caller cuts short may end in `error` after `response`.
        note = notes.of(flow)
        if note is None or note.get("audited"):
            return
        note["audited"] = True
        if self.writer is not None:
            self.writer.write(live_entry(flow, note))
        annotate(flow, note, status)

    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow, flow.response.status_code if flow.response else None)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow, None)

    def done(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
