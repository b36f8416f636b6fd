"""The Settings addon: the `tokengate_*` options, quotas.yaml loaded and watched, and the
operator's commands (`tokengate.reload`, `tokengate.status`).

quotas.yaml is watched while the gate runs: an edit takes effect without a restart, and an edit
that does not validate is refused in the log while the last good configuration keeps serving.

mitmproxy calls a command synchronously and does not await what it returns, while reading the
file and asking the store are awaited work. So each command starts a task on the event loop and
its answer goes to the log, where mitmdump, the console and mitmweb all show it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine

from mitmproxy import command, ctx, exceptions
from mitmproxy.utils import asyncio_utils, human

from . import tokens
from .commands import status_report
from .config import Config, load_config
from .gate import Gate
from .prices import PriceBook
from .stores import Store, StoreUnavailable, open_store
from .yamlsource import ConfigError

log = logging.getLogger("tokengate")


def size_option(name: str) -> int:
    """The bytes of a size option (`512k`, `32m`); OptionsError naming the option otherwise."""
    text = getattr(ctx.options, name)
    try:
        size = human.parse_size(text)
    except ValueError:
        size = None
    if not size or size <= 0:
        raise exceptions.OptionsError(f"{name}: {text!r} is not a size like 512k or 32m")
    return size


def replay_only() -> bool:
    """Flows are read from a file (`-r`) and no proxy server runs (`-n`): QA replay alone, which
    sends nothing upstream (so needs no provider key) and keeps a store of its own."""
    return bool(getattr(ctx.options, "rfile", None)) and not ctx.options.server


FileSignature = tuple[int, int, int]


def file_signature(path: str | os.PathLike) -> FileSignature | None:
    """Inode, size and mtime: an edit in place changes the last two, a rename-replace the first."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _read(path: str, replaying: bool) -> tuple[FileSignature | None, Config | ConfigError]:
    """The file's signature, then its configuration (or why it is refused); runs in a thread.

    The signature is taken first, so a write that lands while the file is read shows as a
    change on the next look.
    """
    signature = file_signature(path)
    try:
        return signature, load_config(path, check_credentials=not replaying)
    except ConfigError as e:
        return signature, e


class Settings:
    """Declares the `tokengate_*` options and loads the quotas file they name, live.

    A broken file at start-up is logged as `file:line: reason`, which makes mitmdump exit with
    status 1; a broken file later (an edit, or `--set` in the console) is refused with that same
    line and the last good configuration keeps serving.

    The file is watched like mitmproxy watches its scripts: one look (a `stat`, off the event
    loop) per `WATCH_INTERVAL` seconds, however busy the gate is.
    """

    WATCH_INTERVAL = 1.0
    # Editors write a file in several steps; a change is read only once it has held this long.
    SETTLE_SECONDS = 0.1

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self._signature: FileSignature | None = None  # of the file as last read
        self._watcher: asyncio.Task | None = None
        self._retired: list[Store] = []  # stores replaced by a reload, closed at shutdown

    def load(self, loader) -> None:
        loader.add_option(
            "tokengate_config", str, "quotas.yaml", "Path of the TokenGate quotas file."
        )
        loader.add_option(
            "tokengate_max_body",
            str,
            "32m",
            "Largest request body TokenGate accepts on governed flows (e.g. 512k, 32m); larger "
            "ones get 413 before they are read into the tokenizer.",
        )
        loader.add_option(
            "tokengate_tokenize_max",
            str,
            "1m",
            "Prompt text tokenized exactly per request (e.g. 512k, 4m; in characters); beyond "
            "it each further UTF-8 byte counts as one token, an upper bound that keeps a huge "
            "prompt's estimate short. Settlement uses the provider's reported usage.",
        )

    def configure(self, updated: set[str]) -> None:
        if "stream_large_bodies" in updated:
            self.gate.stream_request_bodies = bool(ctx.options.stream_large_bodies)
        if "tokengate_max_body" in updated:
            self.gate.max_body = size_option("tokengate_max_body")
        if "tokengate_tokenize_max" in updated:
            self.gate.exact_prompt_chars = size_option("tokengate_tokenize_max")
        if "tokengate_config" not in updated:
            return
        self.gate.replay_only = replay_only()
        signature = file_signature(ctx.options.tokengate_config)
        try:
            config = load_config(
                ctx.options.tokengate_config, check_credentials=not self.gate.replay_only
            )
        except ConfigError as e:
            if self.gate.config is None:
                log.error("tokengate: refusing to start: %s", e)
                return
            raise exceptions.OptionsError(f"tokengate: {e}") from e
        tokens.build_in_background()
        self._install(config, signature)

    def _install(self, config: Config, signature: FileSignature | None, why: str = "") -> None:
        """Serve `config`. A store in a new place is opened (they connect on first use); the old
        one stays open for the reservations it holds, until shutdown."""
        previous = self.gate.config
        if self.gate.replay_only:
            pass  # QA replay keeps a store of its own; the live one is not opened
        elif previous is None or previous.store.place != config.store.place:
            self._retired.append(self.gate.store)
            self.gate.store = open_store(config.store, self.gate.clock)
        else:
            self.gate.store.stale_after = config.store.reservation_timeout
        self.gate.config = config
        if config.budgeted:
            PriceBook.load_in_background()  # priced requests will need the bundled table
        self._signature = signature
        log.info("tokengate: %s%s", f"reloaded ({why}): " if why else "", self.gate.summary())

    async def reload(self, why: str) -> bool:
        """Read the quotas file again; on a refusal the last good configuration keeps serving."""
        path = ctx.options.tokengate_config
        signature, loaded = await asyncio.to_thread(_read, path, self.gate.replay_only)
        if path != ctx.options.tokengate_config:
            return False  # the option moved to another file meanwhile; that load wins
        if isinstance(loaded, ConfigError):
            self._signature = signature  # refused once, not again every second
            log.error(
                "tokengate: reload (%s) refused, the last good configuration keeps serving: %s",
                why,
                loaded,
            )
            return False
        self._install(loaded, signature, why)
        return True

    async def watch(self) -> None:
        """Reload whenever the file's signature changes; a file that vanished is waited for."""
        while True:
            await asyncio.sleep(self.WATCH_INTERVAL)
            path = ctx.options.tokengate_config
            signature = await asyncio.to_thread(file_signature, path)
            if signature == self._signature:
                continue
            if signature is None:
                # Some editors delete and re-create; the config in memory keeps serving.
                log.warning("tokengate: %s is gone; the last good configuration serves", path)
                self._signature = None
                continue
            await asyncio.sleep(self.SETTLE_SECONDS)
            if await asyncio.to_thread(file_signature, path) == signature:
                try:
                    await self.reload("file changed")
                except Exception:  # a bug must not end the watching: later edits still count
                    self._signature = signature
                    log.exception("tokengate: reload failed; the last good configuration serves")

    def running(self) -> None:
        # With the default eager strategy a reverse proxy whose upstream is down drops the client
        # before any HTTP hook runs, so the gate could not even answer 401 or 429.
        if ctx.options.connection_strategy != "lazy" and not self.gate.replay_only:
            ctx.options.update(connection_strategy="lazy")
            log.info("tokengate: connection_strategy set to lazy")
        self.start_watching()
        self.gate.estimates.start()

    def start_watching(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio_utils.create_task(
                self.watch(), name="tokengate quotas watcher", keep_ref=True
            )

    @staticmethod
    def _start(coroutine: Coroutine, name: str) -> None:
        asyncio_utils.create_task(coroutine, name=name, keep_ref=True)

    @command.command("tokengate.reload")
    def reload_now(self) -> None:
        """Read the quotas file again now; the outcome is logged."""
        self._start(self.reload("tokengate.reload"), "tokengate.reload")

    @command.command("tokengate.status")
    def status(self) -> None:
        """Log the configuration summary and every key's live usage per limit."""
        self._start(self._log_status(), "tokengate.status")

    async def _log_status(self) -> None:
        try:
            report = await status_report(self.gate)
        except StoreUnavailable as e:  # the moment an operator most needs an answer
            report = f"tokengate status: {self.gate.summary()}\n  usage store unavailable: {e}"
        log.info("%s", report)

    async def done(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        await self.gate.writes.caught_up()  # settlements still on their way land first
        await self.gate.estimates.close()  # what was learned since the last sync, kept
        for store in (*self._retired, self.gate.store):
            await store.close()
        self._retired.clear()
