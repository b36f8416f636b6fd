"""Which flows are governed, by which proxy entry, and where they go upstream.

Reverse mode routes by the proxy's context path (`/rate-limited-proxy/chat/completions`);
regular mode routes by the destination host (`api.openai.com`), which mitmproxy takes from the
connection, not from the spoofable Host header. Everything else is not ours and passes untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ReverseMode

from .config import Config, Proxy

# Endpoints whose responses report token usage; other governed paths are forwarded unmetered.
METERED_ENDPOINTS = ("chat/completions", "completions", "embeddings", "responses")


@dataclass(frozen=True)
class Route:
    candidates: tuple[Proxy, ...]  # one in reverse mode; in regular mode the caller's key decides
    upstream_path: str | None  # reverse mode: path and query to append to the provider's base URL
    endpoint: str | None  # a METERED_ENDPOINTS entry when the request is metered


def _endpoint(method: str, upstream_path: str) -> str | None:
    path = upstream_path.split("?", 1)[0].strip("/")
    if path.startswith("v1/"):
        path = path[3:]
    return path if method == "POST" and path in METERED_ENDPOINTS else None


def _below(prefix: str, path: str) -> str | None:
    """The rest of `path` below `prefix`, or None when `path` is not under it."""
    if not prefix:
        return path
    if path == prefix or path.startswith((prefix + "/", prefix + "?")):
        return path[len(prefix) :] or "/"
    return None


def route(config: Config, request: http.Request, reverse_mode: bool) -> Route | None:
    if reverse_mode:
        for proxy in sorted(config.proxies.values(), key=lambda p: -len(p.context)):
            rest = _below(proxy.context, request.path)
            if rest is not None:
                rest = rest if rest.startswith("/") else "/" + rest
                return Route((proxy,), rest, _endpoint(request.method, rest))
        return None
    host = request.host.lower()
    candidates = tuple(p for p in config.proxies.values() if host in p.provider.hosts)
    if not candidates:
        return None
    return Route(candidates, None, _endpoint(request.method, request.path))


def is_reverse(flow: http.HTTPFlow) -> bool:
    return isinstance(flow.client_conn.proxy_mode, ReverseMode)
