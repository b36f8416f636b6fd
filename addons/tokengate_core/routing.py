"""Which flows are governed, by which proxy entry, and where they go upstream.

Reverse mode routes by the proxy's context path (`/rate-limited-proxy/chat/completions`);
regular mode routes by the destination host (`api.openai.com`), which mitmproxy takes from the
connection, not from the spoofable Host header. Everything else is not ours and passes untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ReverseMode

from .config import Config, Proxy
from .dialects import Dialect

# A caller's own standing (GET): answered by the gate itself, never forwarded.
USAGE_ENDPOINT = "tokengate/usage"


@dataclass(frozen=True)
class Route:
    candidates: tuple[Proxy, ...]  # one in reverse mode; in regular mode the caller's key decides
    upstream_path: str | None  # reverse mode: path and query to append to the provider's base URL
    endpoint: str | None  # the dialect's metered endpoint, or USAGE_ENDPOINT
    allowed: bool  # metered, or a read-only endpoint; anything else is refused by the gate


def classify(method: str, path: str, dialect: Dialect) -> tuple[str | None, bool]:
    """(metered endpoint, allowed) for a path below the provider's base."""
    segments = [unquote(part) for part in path.split("?", 1)[0].split("/") if part]
    if any(part in (".", "..") or "/" in part for part in segments):
        return None, False  # the provider would resolve it to a path we did not check
    if method == "GET" and "/".join(segments).removeprefix("v1/") == USAGE_ENDPOINT:
        return USAGE_ENDPOINT, True
    return dialect.classify(method, segments)


def _below(prefix: str, path: str) -> str | None:
    """The rest of `path` below `prefix`, or None when `path` is not under it."""
    if path == prefix or path.startswith((prefix + "/", prefix + "?")):
        return path[len(prefix) :] or "/"
    return None


def route(config: Config, request: http.Request, reverse_mode: bool) -> Route | None:
    if reverse_mode:
        for proxy in sorted(config.proxies.values(), key=lambda p: -len(p.context)):
            rest = _below(proxy.context, request.path)
            if rest is not None:
                rest = rest if rest.startswith("/") else "/" + rest
                return Route((proxy,), rest, *classify(request.method, rest, proxy.dialect))
        return None
    host = request.host.lower()
    candidates = tuple(p for p in config.proxies.values() if host in p.provider.hosts)
    if not candidates:
        return None
    dialect = candidates[0].dialect
    return Route(candidates, None, *classify(request.method, request.path, dialect))


def is_reverse(flow: http.HTTPFlow) -> bool:
    return isinstance(flow.client_conn.proxy_mode, ReverseMode)
