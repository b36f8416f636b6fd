"""Every answer the gate makes itself, and the rate-limit headers it puts on answers.

Bodies are in the caller's API dialect so that the official SDKs raise their usual exceptions
(`AuthenticationError`, `RateLimitError`) with the message intact. Every answer the gate makes
carries `X-TokenGate-Source: gateway`, so a caller can tell it from the provider's own answer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from mitmproxy import http

from .config import REQUESTS, Proxy
from .dialects import Dialect
from .limiter import Decision, LimitStatus, most_restrictive, seconds_until

SOURCE_HEADER = "X-TokenGate-Source"
# The openai SDKs honour Retry-After up to two minutes and give up past it (MAX_RETRY_AFTER_DELAY).
SDK_MAX_RETRY_WAIT = 120


def go_duration(seconds: float) -> str:
    """A duration as OpenAI's `x-ratelimit-reset-*` headers write it: 6m0s, 1.5s, 20ms."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    secs_text = f"{secs:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{int(hours)}h{int(minutes)}m{secs_text}s"
    if minutes:
        return f"{int(minutes)}m{secs_text}s"
    return f"{secs_text}s"


def _policy_item(status: LimitStatus) -> str:
    return f'"{status.limit.name}";q={status.limit.count};w={status.limit.seconds}'


def _state_item(status: LimitStatus, now: float) -> str:
    return f'"{status.limit.name}";r={status.remaining};t={seconds_until(status.reset_at, now)}'


def ratelimit_headers(
    statuses: Sequence[LimitStatus],
    now: float,
    headline: LimitStatus | None = None,
    dialect: Dialect | None = None,
) -> dict[str, str]:
    """Headers describing every window; `headline` (default: the most restrictive) leads; the
    caller's `dialect` adds its API's own rate-limit headers."""
    headline = headline or most_restrictive(statuses)
    if headline is None:
        return {}
    headers = {
        "X-RateLimit-Limit": str(headline.limit.count),
        "X-RateLimit-Remaining": str(headline.remaining),
        "X-RateLimit-Reset": str(math.ceil(headline.reset_at)),
        "RateLimit-Policy": ", ".join(_policy_item(s) for s in statuses),
        "RateLimit": ", ".join(_state_item(s, now) for s in statuses),
    }
    for kind, chosen in (
        ("tokens", most_restrictive(s for s in statuses if s.limit.dimension != REQUESTS)),
        ("requests", most_restrictive(s for s in statuses if s.limit.dimension == REQUESTS)),
    ):
        if chosen is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(chosen.limit.count)
            headers[f"x-ratelimit-remaining-{kind}"] = str(chosen.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = go_duration(chosen.reset_at - now)
    if dialect is not None:
        headers.update(dialect.ratelimit_headers(statuses, now))
    return headers


def put_headers(message: http.Message, headers: dict[str, str]) -> None:
    """Set many headers at once, replacing same-named ones (Headers.update rescans per name)."""
    names = {name.lower().encode() for name in headers}
    kept = tuple(field for field in message.headers.fields if field[0].lower() not in names)
    message.headers.fields = kept + tuple(
        (name.encode(), value.encode()) for name, value in headers.items()
    )


def gate_response(
    dialect: Dialect,
    status: int,
    message: str,
    type_: str,
    code: str | None,
    headers: dict[str, str] | None = None,
) -> http.Response:
    """An error answered by the gate itself, in the caller's dialect."""
    all_headers = {"Content-Type": "application/json", SOURCE_HEADER: "gateway", **(headers or {})}
    return http.Response.make(status, dialect.error_body(message, type_, code), all_headers)


def invalid_request(
    dialect: Dialect,
    status: int,
    message: str,
    code: str | None,
    headers: dict[str, str] | None = None,
) -> http.Response:
    """A refusal of the request itself (not of the budget): 400, 401, 403, 413."""
    return gate_response(dialect, status, message, "invalid_request_error", code, headers)


def unauthorized(dialect: Dialect, reason: str) -> http.Response:
    return invalid_request(
        dialect, 401, reason, "invalid_api_key", {"WWW-Authenticate": 'Bearer realm="tokengate"'}
    )


def missing_key(dialect: Dialect) -> http.Response:
    return unauthorized(
        dialect,
        "Missing API key. Send your TokenGate key as 'Authorization: Bearer <key>' "
        "or 'X-API-Key: <key>'.",
    )


def conflicting_keys(dialect: Dialect, headers: Sequence[str]) -> http.Response:
    return unauthorized(
        dialect,
        f"Different API keys were sent in {', '.join(headers)}. Send your TokenGate key once, "
        "or the same key in each.",
    )


def expired_key(dialect: Dialect, name: str, expired_at: str) -> http.Response:
    """Named, so its holder knows to ask for a new key rather than suspect a typo."""
    return unauthorized(
        dialect,
        f"This API key ({name!r}) expired at {expired_at}. Ask the gateway's operator for a "
        "new one.",
    )


def unknown_context(dialect: Dialect, path: str, contexts: Sequence[str]) -> http.Response:
    """404 for a reverse-mode path under no proxy's context that carries a credential."""
    return invalid_request(
        dialect,
        404,
        f"No TokenGate proxy serves {path.split('?', 1)[0]}; the gateway's proxies are at "
        f"{', '.join(contexts)}. The request was not forwarded.",
        "unknown_url",
    )


def endpoint_not_allowed(dialect: Dialect, method: str, path: str) -> http.Response:
    return invalid_request(
        dialect,
        403,
        f"{method} {path} is not available through this gateway: it serves {dialect.served}.",
        "endpoint_not_allowed",
    )


def unreadable_body(dialect: Dialect, reason: str) -> http.Response:
    return invalid_request(
        dialect, 400, f"We could not parse the JSON body of your request: {reason}.", None
    )


def invalid_body(dialect: Dialect, reason: str) -> http.Response:
    """400 for a body its API would refuse (a required field missing): it never leaves."""
    return invalid_request(dialect, 400, reason, None)


def too_large(dialect: Dialect, limit: int) -> http.Response:
    return invalid_request(
        dialect,
        413,
        f"Request body too large for this gateway: the limit is {limit} bytes.",
        "request_too_large",
    )


def rate_limited(
    dialect: Dialect, decision: Decision, now: float, proxy: str, requested: int
) -> http.Response:
    """429 for a refused reservation: when to retry, and which limit refused, in words too."""
    blocking = decision.blocking
    assert blocking is not None, "a refused decision names its limit"
    limit = blocking.limit
    unit = "requests" if limit.dimension == REQUESTS else limit.dimension.replace("_", " ")
    used = blocking.used + blocking.reserved
    headers = ratelimit_headers(decision.statuses, now, headline=blocking, dialect=dialect)
    headers["X-RateLimit-Quota"] = limit.name
    if decision.retry_at is None:
        message = (
            f"Request too large for proxy {proxy!r} on {unit} per {limit.label}: limit "
            f"{limit.count}, requested {requested}. Reduce the prompt or max tokens."
        )
        headers["x-should-retry"] = "false"
    else:
        wait = decision.retry_at - now
        retry_after = seconds_until(decision.retry_at, now)
        headers["X-RateLimit-Reset"] = str(math.ceil(decision.retry_at))
        headers["Retry-After"] = str(retry_after)
        headers["retry-after-ms"] = str(max(0, math.ceil(wait * 1000)))
        if retry_after > SDK_MAX_RETRY_WAIT:
            headers["x-should-retry"] = "false"
        message = (
            f"Rate limit reached for proxy {proxy!r} on {unit} per {limit.label} "
            f"({limit.name}): limit {limit.count}, used {used}, requested {requested}. "
            f"Please try again in {go_duration(wait)}."
        )
    code_type = "requests" if limit.dimension == REQUESTS else "tokens"
    return gate_response(dialect, 429, message, code_type, "rate_limit_exceeded", headers)


def store_unavailable(dialect: Dialect, retry_after: int) -> http.Response:
    """503 while the usage store is down and the proxy fails closed: no quota check, no call."""
    return gate_response(
        dialect,
        503,
        "TokenGate cannot reach its usage store, so it cannot check your quota; the request was "
        f"not sent. Please try again in {retry_after}s.",
        "server_error",
        "quota_store_unavailable",
        {"Retry-After": str(retry_after), "retry-after-ms": str(retry_after * 1000)},
    )


def usage_unavailable(dialect: Dialect) -> http.Response:
    """503 for the usage endpoint while the store is down."""
    message = "The usage store is unreachable; try again shortly."
    return gate_response(dialect, 503, message, "server_error", None, {"Retry-After": "1"})


def standing(
    proxy: Proxy, key: str, statuses: tuple[LimitStatus, ...], now: float
) -> dict[str, Any]:
    """A caller's own windows, as the usage endpoint shows them."""
    return {
        "object": "tokengate.usage",
        "proxy": proxy.name,
        "key": key,
        "scope": proxy.scope,
        "limits": [
            {
                "name": status.limit.name,
                "dimension": status.limit.dimension,
                "limit": status.limit.count,
                "window_seconds": status.limit.seconds,
                "used": status.used,
                "reserved": status.reserved,
                "remaining": status.remaining,
                "reset": math.ceil(status.reset_at),
                "reset_in_seconds": seconds_until(status.reset_at, now),
            }
            for status in statuses
        ],
    }


def usage_report(
    proxy: Proxy, key: str, statuses: tuple[LimitStatus, ...], now: float
) -> http.Response:
    """`GET <context>/tokengate/usage`: the caller's standing, answered by the gate itself."""
    body = json.dumps(standing(proxy, key, statuses, now), indent=2).encode()
    headers = {"Content-Type": "application/json", SOURCE_HEADER: "gateway"}
    headers.update(ratelimit_headers(statuses, now))
    return http.Response.make(200, body, headers)
