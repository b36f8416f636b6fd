"""The gate's shared state and the addon that fills it from mitmproxy options and quotas.yaml."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mitmproxy import ctx, exceptions
from mitmproxy.utils import human

from . import tokens
from .config import Config, Proxy, load_config
from .stores import Store, StoreUnavailable, open_store
from .stores.memory import MemoryStore
from .yamlsource import ConfigError

log = logging.getLogger("tokengate")


@dataclass
class Gate:
    """What every TokenGate addon of one mitmdump process shares."""

    config: Config | None = None
    store: Store = field(default_factory=MemoryStore)
    clock: Callable[[], float] = time.time
    max_body: int = 32 * 1024 * 1024  # request bodies above this are refused before tokenizing
    stream_request_bodies: bool = False  # mitmproxy's stream_large_bodies is set

    def proxy(self, name: str) -> Proxy | None:
        return self.config.proxies.get(name) if self.config else None


class Settings:
    """Declares the `tokengate_*` options and loads the quotas file they name.

    A broken file at start-up is logged as `file:line: reason`, which makes mitmdump exit with
    status 1; a broken file later is refused with OptionsError and the last good one stays.
    """

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self._closing: asyncio.Task | None = None

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

    def configure(self, updated: set[str]) -> None:
        if "stream_large_bodies" in updated:
            self.gate.stream_request_bodies = bool(ctx.options.stream_large_bodies)
        if "tokengate_max_body" in updated:
            try:
                size = human.parse_size(ctx.options.tokengate_max_body)
            except ValueError:
                size = None
            if not size or size <= 0:
                raise exceptions.OptionsError(
                    f"tokengate_max_body: {ctx.options.tokengate_max_body!r} is not a size "
                    "like 512k or 32m"
                )
            self.gate.max_body = size
        if "tokengate_config" not in updated:
            return
        try:
            config = load_config(ctx.options.tokengate_config)
        except ConfigError as e:
            if self.gate.config is None:
                log.error("tokengate: refusing to start: %s", e)
                return
            raise exceptions.OptionsError(f"tokengate: {e}") from e
        tokens.preload()
        previous = self.gate.config
        if previous is None or previous.store != config.store:
            try:
                store = open_store(config.store, self.gate.clock)
            except StoreUnavailable as e:
                if previous is None:
                    log.error("tokengate: refusing to start: %s: store: %s", config.path, e)
                    return
                raise exceptions.OptionsError(f"tokengate: store: {e}") from e
            self._replace_store(store)
        self.gate.config = config
        log.info("tokengate: %s: %s", config.path, config.summary())

    def _replace_store(self, store: Store) -> None:
        old, self.gate.store = self.gate.store, store
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # configured outside mitmproxy's loop (scripts, some tests)
            asyncio.run(old.close())
            return
        # Flows still holding the old store finish their call first; keep the task referenced.
        self._closing = loop.create_task(old.close())

    async def done(self) -> None:
        await self.gate.store.close()

    def running(self) -> None:
        # With the default eager strategy a reverse proxy whose upstream is down drops the client
        # before any HTTP hook runs, so the gate could not even answer 401 or 429.
        if ctx.options.connection_strategy != "lazy":
            ctx.options.update(connection_strategy="lazy")
            log.info("tokengate: connection_strategy set to lazy")
