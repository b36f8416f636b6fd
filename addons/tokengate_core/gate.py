"""What every TokenGate addon of one mitmdump process shares: the configuration in force, the
usage store, the learned estimates, the clock, and the options that bound request reading."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import tokens
from .config import Config, Proxy
from .estimates import Estimates
from .probes import Probes
from .stores import Store
from .stores.memory import MemoryStore
from .writebehind import WriteBehind


@dataclass
class Gate:
    """What every TokenGate addon of one mitmdump process shares."""

    config: Config | None = None
    store: Store = field(default_factory=MemoryStore)
    clock: Callable[[], float] = time.time
    max_body: int = 32 * 1024 * 1024  # request bodies above this are refused before tokenizing
    exact_prompt_chars: int = tokens.EXACT_PROMPT_CHARS  # tokenized exactly; the rest bounded
    stream_request_bodies: bool = False  # mitmproxy's stream_large_bodies is set
    writes: WriteBehind = field(default_factory=WriteBehind)  # settlements on their way
    replay_only: bool = False  # `mitmdump -nr`: no proxy server, so nothing goes upstream
    probes: Probes = field(default_factory=Probes)  # told of store calls and queue waits
    estimates: Estimates = field(init=False)  # learned prompt counts, kept in `store`

    def __post_init__(self) -> None:
        self.estimates = Estimates(lambda: self.store)

    def proxy(self, name: str) -> Proxy | None:
        return self.config.proxies.get(name) if self.config else None

    def summary(self) -> str:
        """The one line the log shows at start and after each reload."""
        assert self.config is not None
        return f"{self.config.path}: {self.config.summary(replay=self.replay_only)}"
