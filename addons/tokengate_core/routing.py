"""Which flows are governed, by which proxy entry, and where they go upstream.

Reverse mode routes by the proxy's context path (`/rate-limited-proxy/chat/completions`);
regular mode routes by the destination host (`api.openai.com`), which mitmproxy takes from the
connection, not from the spoofable Host header. Everything else is not ours and passes untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ReverseMode

from .config import Config, Proxy
from .dialects import Dialect, Endpoint

# A caller's own standing (GET): answered by the gate itself, never forwarded.
USAGE_ENDPOINT = "tokengate/usage"


@dataclass(frozen=True)
class Route:
    candidates: tuple[Proxy, ...]  # one in reverse mode; in regular mode the caller's key decides
    upstream_path: str | None  # reverse mode: path and query to append to the provider's base URL
    endpoint: str | None  # the dialect's metered endpoint, or USAGE_ENDPOINT
    allowed: bool  # metered, or a read-only endpoint; anything else is refused by the gate
    deployment: str | None = None  # a deployment the path names (Azure)


def classify(method: str, path: str, dialect: Dialect) -> Endpoint:
    """What a path below the provider's base asks of it."""
    segments = [unquote(part) for part in path.split("?", 1)[0].split("/") if part]
    if any(part in (".", "..") or "/" in part for part in segments):
        return Endpoint(None, False)  # the provider would resolve it to a path we did not check
    if method == "GET" and "/".join(segments).removeprefix("v1/") == USAGE_ENDPOINT:
        return Endpoint(USAGE_ENDPOINT, True)
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


def route_saved(config: Config, request: http.Request, saved: Mapping) -> Route | None:
    """A client replay (`-C`) of a flow the gate sent in reverse mode: its URL is the provider's
    it was sent to, so the proxy and the path below it come from the notes saved with it (the
    caller's key is checked again all the same)."""
    proxy = config.proxies.get(saved.get("proxy") or "")
    path = saved.get("upstream_path")
    if proxy is None or not isinstance(path, str):
        return None
    return Route((proxy,), path, *classify(request.method, path, proxy.dialect))


def _presented_secrets(config: Config, request: http.Request) -> set[str]:
    """Every value a caller credential header of any configured dialect carries."""
    names = {name for p in config.proxies.values() for name in p.dialect.credential_headers}
    found = set()
    for name in names:
        for value in request.headers.get_all(name):
            scheme, _, token = value.strip().partition(" ")
            found.add(token.strip() if scheme.lower() == "bearer" else value.strip())
    return found - {""}


def stray_credential(config: Config, request: http.Request, passthrough: Sequence[str]) -> bool:
    """Reverse mode, a path under no context (a typo, another casing): True when forwarding it
    would hand a credential to the reverse target that must not reach it: a TokenGate key, or
    any credential at all where that target is a configured provider. Paths under a
    `passthrough` prefix are the operator's to forward."""
    if any(_below(prefix, request.path) is not None for prefix in passthrough):
        return False
    secrets = _presented_secrets(config, request)
    if not secrets:
        return False
    host = request.host.lower()
    if any(host in provider.hosts for provider in config.providers.values()):
        return True
    return any(p.keys.find(secret) for p in config.proxies.values() for secret in secrets)
