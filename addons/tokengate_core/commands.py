"""The operator's commands: `tokengate.reload` and `tokengate.status` (mitmproxy console, mitmweb).

mitmproxy calls a command synchronously and does not await what it returns, while reading the
file and asking the store are awaited work (the store may be a database). So each command starts
a task on the event loop and its answer goes to the log, where mitmdump, the console and mitmweb
all show it.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine

from mitmproxy import command
from mitmproxy.utils import asyncio_utils

from .config import Proxy
from .keys import format_timestamp
from .limiter import LimitStatus, seconds_until
from .metering import buckets_for
from .settings import Gate, Settings, summary
from .stores import StoreUnavailable

log = logging.getLogger("tokengate")


def _windows(statuses: tuple[LimitStatus, ...], now: float) -> str:
    return "; ".join(
        f"{s.limit.name} {s.used} used + {s.reserved} reserved of {s.limit.count}, "
        f"{s.remaining} left, {_whole(s, now)}"
        for s in statuses
    )


def _whole(status: LimitStatus, now: float) -> str:
    """When the window has its full count back; a window nothing is charged to has it now."""
    if status.used == status.reserved == 0:
        return "whole"
    return f"whole again in {seconds_until(status.reset_at, now)}s"


def _expiry(expires: float | None, now: float) -> str:
    if expires is None:
        return ""
    word = "EXPIRED" if now >= expires else "expires"
    return f" [{word} {format_timestamp(expires)}]"


async def status_report(gate: Gate) -> str:
    """The reload summary plus, per key (or per proxy when shared), every window as it stands."""
    if gate.config is None:
        return "tokengate status: no configuration loaded"
    await gate.writes.caught_up()  # the usage of requests already answered
    now = gate.clock()
    lines = [f"tokengate status: {summary(gate)}"]
    for proxy in gate.config.proxies.values():
        lines += await _proxy_lines(gate, proxy, now)
    return "\n".join(lines)


async def _proxy_lines(gate: Gate, proxy: Proxy, now: float) -> list[str]:
    if not proxy.limits:
        return [f"  {proxy.name}: no limits; keys: {', '.join(k.name for k in proxy.keys)}"]
    lines = []
    if proxy.scope == "proxy":
        statuses = await gate.store.status(buckets_for(proxy, "*"))
        lines.append(f"  {proxy.name} (shared by all keys): {_windows(statuses, now)}")
    for key in proxy.keys:
        usage = ""
        if proxy.scope == "key":
            usage = ": " + _windows(await gate.store.status(buckets_for(proxy, key.name)), now)
        lines.append(f"  {proxy.name}/{key.name}{_expiry(key.expires, now)}{usage}")
    return lines


class Commands:
    def __init__(self, gate: Gate, settings: Settings) -> None:
        self.gate = gate
        self.settings = settings

    @staticmethod
    def _start(coroutine: Coroutine, name: str) -> None:
        asyncio_utils.create_task(coroutine, name=name, keep_ref=True)

    @command.command("tokengate.reload")
    def reload(self) -> None:
        """Read the quotas file again now; the outcome is logged."""
        self._start(self.settings.reload("tokengate.reload"), "tokengate.reload")

    @command.command("tokengate.status")
    def status(self) -> None:
        """Log the configuration summary and every key's live usage per limit."""
        self._start(self._log_status(), "tokengate.status")

    async def _log_status(self) -> None:
        try:
            report = await status_report(self.gate)
        except StoreUnavailable as e:  # the moment an operator most needs an answer
            report = f"tokengate status: {summary(self.gate)}\n  usage store unavailable: {e}"
        log.info("%s", report)
