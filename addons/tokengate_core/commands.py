"""What `tokengate.status` reports: the configuration summary and every window as it stands."""

from __future__ import annotations

from .config import Proxy, amount
from .gate import Gate
from .keys import format_timestamp
from .limiter import LimitStatus, seconds_until
from .quota import buckets_for


def _windows(statuses: tuple[LimitStatus, ...], now: float) -> str:
    return "; ".join(
        f"{s.limit.name} {amount(s.limit, s.used)} used + {amount(s.limit, s.reserved)} "
        f"reserved of {amount(s.limit)}, {amount(s.limit, s.remaining)} left, {_whole(s, now)}"
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
    lines = [f"tokengate status: {gate.summary()}"]
    for proxy in gate.config.proxies.values():
        lines += await _proxy_lines(gate, proxy, now)
    return "\n".join(lines)


async def _proxy_lines(gate: Gate, proxy: Proxy, now: float) -> list[str]:
    if not proxy.limits:
        return [f"  {proxy.name}: no limits; keys: {', '.join(k.name for k in proxy.keys)}"]

    def scoped(key: str, scope: str):
        return tuple(b for b in buckets_for(proxy, key) if (b.limit.scope or proxy.scope) == scope)

    lines = []
    shared = scoped("*", "proxy")
    if shared:
        statuses = await gate.store.status(shared)
        lines.append(f"  {proxy.name} (shared by all keys): {_windows(statuses, now)}")
    for key in proxy.keys:
        own = scoped(key.name, "key")
        usage = ": " + _windows(await gate.store.status(own), now) if own else ""
        lines.append(f"  {proxy.name}/{key.name}{_expiry(key.expires, now)}{usage}")
    return lines
