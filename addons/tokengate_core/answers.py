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

from .config import REQUESTS, Proxy, amount
from .dialects import Dialect
from .limiter import (
    BUDGET,
    TOKEN_DIMENSIONS,
    Decision,
    Demand,
    Limit,
    LimitStatus,
    most_restrictive,
    seconds_until,
    terms_of,
)
from .prices import usd_text

SOURCE_HEADER = "X-TokenGate-Source"
COST_HEADER = "X-TokenGate-Cost"  # USD this call cost
BUDGET_REMAINING_HEADER = "X-TokenGate-Budget-Remaining"  # USD left in the tightest budget
BUDGET_RESET_HEADER = "X-TokenGate-Budget-Reset"  # epoch seconds when it is whole again
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


def dollars(micro: int) -> str:
    """Micro-dollars as a header writes USD: `0.007250`."""
    return usd_text(micro).removeprefix("$")


def ratelimit_headers(
    statuses: Sequence[LimitStatus],
    now: float,
    headline: LimitStatus | None = None,
    dialect: Dialect | None = None,
) -> dict[str, str]:
    """Headers describing every window; `headline` (default: the most restrictive token or
    request limit) leads. Budgets, counted in money, have headers of their own; the caller's
    `dialect` adds its API's own rate-limit headers."""
    counted = [s for s in statuses if s.limit.dimension != BUDGET]
    headline = headline or most_restrictive(counted)
    headers = {}
    if headline is not None:
        headers = {
            "X-RateLimit-Limit": str(headline.limit.count),
            "X-RateLimit-Remaining": str(headline.remaining),
            "X-RateLimit-Reset": str(math.ceil(headline.reset_at)),
            "RateLimit-Policy": ", ".join(_policy_item(s) for s in statuses),
            "RateLimit": ", ".join(_state_item(s, now) for s in statuses),
        }
    for kind, chosen in (
        ("tokens", most_restrictive(s for s in counted if s.limit.dimension in TOKEN_DIMENSIONS)),
        ("requests", most_restrictive(s for s in counted if s.limit.dimension == REQUESTS)),
    ):
        if chosen is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(chosen.limit.count)
            headers[f"x-ratelimit-remaining-{kind}"] = str(chosen.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = go_duration(chosen.reset_at - now)
    budget = most_restrictive(s for s in statuses if s.limit.dimension == BUDGET)
    if budget is not None:
        headers[BUDGET_REMAINING_HEADER] = dollars(budget.remaining)
        headers[BUDGET_RESET_HEADER] = str(math.ceil(budget.reset_at))
    if dialect is not None:
        headers.update(dialect.ratelimit_headers(counted, now))
    return headers


def described(limit: Limit, proxy: Proxy, named: bool = True) -> str:
    """A limit in words: `total tokens per 1m (total_tokens-1m)`; a limit with a model filter
    or a scope of its own says them: `... for models gpt-4o*, shared by the proxy's keys`."""
    unit = {REQUESTS: "requests", BUDGET: "USD"}.get(
        limit.dimension, limit.dimension.replace("_", " ")
    )
    words = f"{unit} per {limit.label}" + (f" ({limit.name})" if named else "")
    if limit.models:
        words += f" for models {', '.join(limit.models)}"
    if limit.models or limit.scope:
        scope = limit.scope or proxy.scope
        words += ", per key" if scope == "key" else ", shared by the proxy's keys"
    return words


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
    dialect: Dialect, decision: Decision, now: float, proxy: Proxy, demand: Demand
) -> http.Response:
    """429 for a refused reservation: when to retry, and which limit refused (its model filter
    and scope too), in words too. A spent budget is OpenAI's `insufficient_quota`."""
    blocking = decision.blocking
    assert blocking is not None, "a refused decision names its limit"
    limit = blocking.limit
    need = terms_of(limit, demand).minimum
    used = blocking.used + blocking.reserved
    budget = limit.dimension == BUDGET
    # A budget, in money, has headers of its own: X-RateLimit-* keep describing token limits.
    headline = None if budget else blocking
    headers = ratelimit_headers(decision.statuses, now, headline=headline, dialect=dialect)
    headers["X-RateLimit-Quota"] = limit.name
    what = described(limit, proxy)
    if decision.retry_at is None:
        message = (
            f"Request too large for proxy {proxy.name!r} on {described(limit, proxy, False)}: "
            f"limit {amount(limit)}, "
            f"requested {amount(limit, need)}. Reduce the prompt or max tokens."
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
        if budget:
            message = (
                f"Budget reached for proxy {proxy.name!r}: {what} of {amount(limit)}, "
                f"{amount(limit, blocking.remaining)} left, this request needs "
                f"{amount(limit, need)}. It refills enough in {go_duration(wait)}."
            )
        else:
            message = (
                f"Rate limit reached for proxy {proxy.name!r} on {what}: limit {limit.count}, "
                f"used {used}, requested {need}. Please try again in {go_duration(wait)}."
            )
    if budget:
        return gate_response(
            dialect, 429, message, "insufficient_quota", "insufficient_quota", headers
        )
    code_type = "requests" if limit.dimension == REQUESTS else "tokens"
    return gate_response(dialect, 429, message, code_type, "rate_limit_exceeded", headers)


def model_not_allowed(dialect: Dialect, model: str, proxy: Proxy) -> http.Response:
    """403 for a model outside the proxy's allow-list, naming what is allowed."""
    return invalid_request(
        dialect,
        403,
        f"The model {model!r} is not available through proxy {proxy.name!r}: it allows "
        f"{', '.join(proxy.models)}.",
        "model_not_allowed",
    )


def unpriced(dialect: Dialect, proxy: str, model: str | None) -> http.Response:
    """403 for a request a budget cannot count: its model has no known price (or none is
    known yet: with mitmproxy's stream_large_bodies the gate decides before reading the body)."""
    if model is None:
        why = "the request's model is not known when the gate must decide (its body streams)"
    else:
        why = f"the model {model!r} has no known price"
    return invalid_request(
        dialect,
        403,
        f"Proxy {proxy!r} has a budget in USD, but {why}, so the request was not sent. The "
        "gateway's operator can add the model's price under `prices:` in quotas.yaml (for an "
        "Azure deployment, the model it serves under the provider's `deployments:`).",
        "model_price_unknown",
    )


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


def gate_error(dialect: Dialect) -> http.Response:
    """500 when the gate failed unexpectedly while admitting: never forwarded unmetered."""
    return gate_response(
        dialect,
        500,
        "TokenGate failed unexpectedly while checking this request against its quotas, so the "
        "request was not sent; the error is in the gateway's log.",
        "server_error",
        "gateway_error",
    )


def usage_unavailable(dialect: Dialect) -> http.Response:
    """503 for the usage endpoint while the store is down."""
    message = "The usage store is unreachable; try again shortly."
    return gate_response(dialect, 503, message, "server_error", None, {"Retry-After": "1"})


def standing(
    proxy: Proxy, key: str, statuses: tuple[LimitStatus, ...], now: float
) -> dict[str, Any]:
    """A caller's windows, each limit in its scope and with its model filter, as the usage
    endpoint shows them; a budget's figures in micro-dollars, and in USD beside them."""
    return {
        "object": "tokengate.usage",
        "proxy": proxy.name,
        "key": key,
        "scope": proxy.scope,
        "limits": [window(status, proxy, now) for status in statuses],
    }


def window(status: LimitStatus, proxy: Proxy, now: float) -> dict[str, Any]:
    limit = status.limit
    shown = {
        "name": limit.name,
        "dimension": limit.dimension,
        "limit": limit.count,
        "window_seconds": limit.seconds,
        "used": status.used,
        "reserved": status.reserved,
        "remaining": status.remaining,
        "reset": math.ceil(status.reset_at),
        "reset_in_seconds": seconds_until(status.reset_at, now),
    }
    if limit.models:
        shown["models"] = list(limit.models)
    if limit.scope:
        shown["scope"] = limit.scope
    if limit.dimension == BUDGET:
        shown["unit"] = "micro_usd"
        shown["limit_usd"] = dollars(limit.count)
        shown["remaining_usd"] = dollars(status.remaining)
    return shown


def usage_report(
    proxy: Proxy, key: str, statuses: tuple[LimitStatus, ...], now: float
) -> http.Response:
    """`GET <context>/tokengate/usage`: the caller's standing, answered by the gate itself."""
    body = json.dumps(standing(proxy, key, statuses, now), indent=2).encode()
    headers = {"Content-Type": "application/json", SOURCE_HEADER: "gateway"}
    headers.update(ratelimit_headers(statuses, now))
    return http.Response.make(200, body, headers)
