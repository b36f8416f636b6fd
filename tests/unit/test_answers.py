"""The answers the gate makes, on a fake clock: what a 429 promises, in every header and in words.

The README promises that `X-RateLimit-Reset` on a 429 is the epoch second (rounded up) when the
refused request would be admitted, and `Retry-After` the seconds to wait for it: waiting that long
is always enough and a second less is not. These tests pin both against the limiter's own
decision, with charges stamped at fractions of a second so that rounding down or reporting when
the window is whole again shows.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st
from tokengate_core import answers
from tokengate_core.config import REQUESTS
from tokengate_core.dialects.openai import OpenAI
from tokengate_core.limiter import (
    BUDGET,
    Bucket,
    Charge,
    Demand,
    Limit,
    LimitStatus,
    Rates,
    decide,
)

from tests.support.limits import limit

TOTAL_100 = limit("total_tokens", 100, 60, "1m")
REQUESTS_3 = limit(REQUESTS, 3, 60, "1m")
# 60 tokens spent at 1000.25 and 40 at 1010.5: full until 1060.25, whole again at 1070.5.
SPENT = [Charge(1000.25, 60, True), Charge(1010.5, 40, True)]
NOW = 1020.0

OPENAI = OpenAI()
PROXY = SimpleNamespace(name="p", scope="key")
RATES = Rates(2_500_000, 10_000_000)


def refused(charges, demand: Demand, now: float = NOW, lim=TOTAL_100):
    decision = decide([(Bucket("p:k", lim), charges)], demand, now)
    assert not decision.admitted
    return decision


def answer_to(decision, now: float = NOW, requested: int = 30):
    answer = answers.rate_limited(OPENAI, decision, now, PROXY, Demand(requested, 0))
    return answer, json.loads(answer.content)["error"]


def test_429_reset_is_when_this_request_fits_rounded_up():
    decision = refused(SPENT, Demand(30, 0))  # fits once the 60 expire: at 1060.25
    assert (decision.retry_at, decision.blocking.reset_at) == (1060.25, 1070.5)
    answer, error = answer_to(decision)
    assert answer.status_code == 429
    # Not 1060 (rounded down: a caller waking then is refused again), not 1071 (whole again).
    assert answer.headers["X-RateLimit-Reset"] == "1061"
    assert answer.headers["Retry-After"] == "41"  # 40.25 s, rounded up
    assert answer.headers["retry-after-ms"] == "40250"
    assert answer.headers["x-ratelimit-reset-tokens"] == "50.5s"  # the window: whole again
    assert "x-should-retry" not in answer.headers
    assert error["message"] == (
        "Rate limit reached for proxy 'p' on total tokens per 1m (total_tokens-1m): "
        "limit 100, used 100, requested 30. Please try again in 40.25s."
    )
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")


def test_429_reset_needs_only_enough_to_expire_not_everything():
    small = refused(SPENT, Demand(1, 0))  # any token frees at 1060.25
    large = refused(SPENT, Demand(61, 0))  # needs both charges gone: 1070.5
    assert answer_to(small)[0].headers["X-RateLimit-Reset"] == "1061"
    assert answer_to(large)[0].headers["X-RateLimit-Reset"] == "1071"
    assert answer_to(large)[0].headers["Retry-After"] == "51"


def test_429_on_a_whole_second_is_not_rounded_further():
    decision = refused([Charge(1000.0, 100, True)], Demand(1, 0), now=1030.0)
    answer, error = answer_to(decision, now=1030.0)
    assert answer.headers["X-RateLimit-Reset"] == "1060"
    assert (answer.headers["Retry-After"], answer.headers["retry-after-ms"]) == ("30", "30000")
    assert error["message"].endswith("Please try again in 30s.")


@given(
    stamps=st.lists(st.tuples(st.integers(0, 480), st.integers(1, 60)), min_size=1, max_size=6),
    need=st.integers(1, 100),
    ahead=st.integers(0, 480),
)
def test_waiting_as_told_is_enough_and_a_second_less_is_not(stamps, need, ahead):
    """On any window (charges stamped at eighths of a second, exact in floating point), at
    now + Retry-After and at X-RateLimit-Reset the same request is admitted; a second before
    either, it is still refused; retry-after-ms is the wait rounded up to the millisecond."""
    charges = [Charge(1000 + at / 8, amount, True) for at, amount in stamps]
    now = max(c.stamp for c in charges) + ahead / 8
    decision = decide([(Bucket("p:k", TOTAL_100), charges)], Demand(need, 0), now)
    if decision.admitted:
        return
    answer, _ = answer_to(decision, now=now, requested=need)
    reset = int(answer.headers["X-RateLimit-Reset"])
    wait = int(answer.headers["Retry-After"])
    for at in (reset, now + wait):
        assert decide([(Bucket("p:k", TOTAL_100), charges)], Demand(need, 0), at).admitted
        assert not decide([(Bucket("p:k", TOTAL_100), charges)], Demand(need, 0), at - 1).admitted
    wait_ms = int(answer.headers["retry-after-ms"])
    assert now + (wait_ms - 1) / 1000 < decision.retry_at <= now + wait_ms / 1000


def test_429_headline_is_the_limit_that_refused_not_the_emptiest():
    """The minute is empty (0 left) but frees soon; the hour has 10 left and refuses the 30
    asked for until 4600: the hour is what the caller waits for, so the headline is the hour."""
    hour = limit("total_tokens", 1000, 3600, "1h")
    windows = [
        (Bucket("p:k:m", TOTAL_100), [Charge(1000.0, 100, True)]),
        (Bucket("p:k:h", hour), [Charge(1000.0, 990, True)]),
    ]
    decision = decide(windows, Demand(30, 0), NOW)
    assert decision.blocking.limit == hour
    answer, error = answer_to(decision)
    assert answer.headers["X-RateLimit-Quota"] == "total_tokens-1h"
    assert (answer.headers["X-RateLimit-Limit"], answer.headers["X-RateLimit-Remaining"]) == (
        "1000",
        "10",
    )
    assert answer.headers["X-RateLimit-Reset"] == "4600"
    assert "per 1h (total_tokens-1h): limit 1000, used 990" in error["message"]


def test_429_for_a_request_that_can_never_fit_says_do_not_retry():
    decision = refused([], Demand(101, 0))
    assert decision.retry_at is None
    answer, error = answer_to(decision, requested=101)
    assert answer.headers["x-should-retry"] == "false"
    assert "Retry-After" not in answer.headers and "retry-after-ms" not in answer.headers
    assert answer.headers["X-RateLimit-Quota"] == "total_tokens-1m"
    assert error["message"] == (
        "Request too large for proxy 'p' on total tokens per 1m: limit 100, requested 101. "
        "Reduce the prompt or max tokens."
    )


def test_429_past_what_the_sdks_wait_says_do_not_retry():
    """The openai SDKs wait up to two minutes: a longer wait is not worth their retrying."""
    hour = limit("total_tokens", 100, 3600, "1h")
    full = [Charge(1000.0, 100, True)]  # fits again at 4600
    cases = ((4480.0, "120", True), (4479.5, "121", False), (1000.0, "3600", False))
    for now, wait, retry in cases:
        answer, _ = answer_to(refused(full, Demand(1, 0), now=now, lim=hour), now=now)
        assert answer.headers["Retry-After"] == wait
        assert ("x-should-retry" not in answer.headers) is retry, now
        if not retry:
            assert answer.headers["x-should-retry"] == "false"


def test_429_of_a_request_limit_names_requests():
    decision = refused([Charge(1000.5, 1, False)] * 3, Demand(5, 0), lim=REQUESTS_3)
    answer, error = answer_to(decision, requested=5)
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert "on requests per 1m (requests-1m): limit 3, used 3, requested 1" in error["message"]
    assert answer.headers["X-RateLimit-Quota"] == "requests-1m"
    assert answer.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-remaining-tokens" not in answer.headers


def test_gate_answers_are_marked_and_openai_shaped():
    answer, error = answer_to(refused(SPENT, Demand(30, 0)))
    assert answer.headers[answers.SOURCE_HEADER] == "gateway"
    assert answer.headers["Content-Type"] == "application/json"
    assert set(error) == {"message", "type", "param", "code"} and error["param"] is None
    unauthorized = answers.unauthorized(OPENAI, "no key")
    assert unauthorized.status_code == 401
    assert unauthorized.headers["WWW-Authenticate"] == 'Bearer realm="tokengate"'
    assert json.loads(unauthorized.content)["error"] == {
        "message": "no key",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    too_large = answers.too_large(OPENAI, 4096)
    assert too_large.status_code == 413
    assert json.loads(too_large.content)["error"]["code"] == "request_too_large"
    assert "4096 bytes" in json.loads(too_large.content)["error"]["message"]
    down = answers.store_unavailable(OPENAI, 5)
    assert down.status_code == 503
    assert (down.headers["Retry-After"], down.headers["retry-after-ms"]) == ("5", "5000")
    assert json.loads(down.content)["error"] == {
        "message": "TokenGate cannot reach its usage store, so it cannot check your quota; the "
        "request was not sent. Please try again in 5s.",
        "type": "server_error",
        "param": None,
        "code": "quota_store_unavailable",
    }


def status(lim, used: int, reserved: int, reset_at: float) -> LimitStatus:
    return LimitStatus(lim, used, reserved, reset_at)


def test_headers_of_an_admitted_request_tell_when_the_window_is_whole():
    minute = status(TOTAL_100, 30, 10, 1050.25)
    hour = status(limit("total_tokens", 1000, 3600, "1h"), 500, 10, 4000.0)
    requests = status(REQUESTS_3, 1, 1, 1041.0)
    headers = answers.ratelimit_headers((minute, hour, requests), now=1020.0)
    # The headline is the most restrictive: requests, 1 left.
    assert headers["X-RateLimit-Limit"] == "3" and headers["X-RateLimit-Remaining"] == "1"
    assert headers["X-RateLimit-Reset"] == "1041"
    assert headers["x-ratelimit-limit-tokens"] == "100"  # the tightest token window
    assert headers["x-ratelimit-remaining-tokens"] == "60"
    assert headers["x-ratelimit-reset-tokens"] == "30.25s"
    assert headers["x-ratelimit-reset-requests"] == "21s"
    assert headers["RateLimit-Policy"] == (
        '"total_tokens-1m";q=100;w=60, "total_tokens-1h";q=1000;w=3600, "requests-1m";q=3;w=60'
    )
    assert headers["RateLimit"] == (
        '"total_tokens-1m";r=60;t=31, "total_tokens-1h";r=490;t=2980, "requests-1m";r=1;t=21'
    )
    only_minute = answers.ratelimit_headers((minute,), now=1020.0)
    assert only_minute["X-RateLimit-Reset"] == "1051"  # 1050.25 rounded up
    assert "x-ratelimit-limit-requests" not in only_minute
    assert answers.ratelimit_headers((), now=1020.0) == {}


def test_go_duration_writes_what_openai_writes():
    cases = {
        -1: "0s",
        0: "0s",
        0.0004: "1ms",
        0.25: "250ms",
        1: "1s",
        1.5: "1.5s",
        60: "1m0s",
        90.25: "1m30.25s",
        3600: "1h0m0s",
        3725.5: "1h2m5.5s",
    }
    assert {seconds: answers.go_duration(seconds) for seconds in cases} == cases


def test_put_headers_replaces_same_named_ones_in_any_case():
    answer = answers.unauthorized(OPENAI, "no key")
    answer.headers.add("x-ratelimit-remaining", "7")
    answer.headers.add("X-RateLimit-Remaining", "8")
    answers.put_headers(answer, {"X-RateLimit-Remaining": "9", "X-New": "1"})
    assert answer.headers.get_all("x-ratelimit-remaining") == ["9"]
    assert answer.headers["x-new"] == "1"
    assert answer.headers["WWW-Authenticate"] == 'Bearer realm="tokengate"'  # others kept


def error_of(answer) -> dict:
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers[answers.SOURCE_HEADER] == "gateway"
    return json.loads(answer.content)["error"]


def test_refusals_of_the_request_itself_say_why_in_the_dialects_shape():
    cases = {
        answers.missing_key(OPENAI): (
            401,
            "invalid_api_key",
            "Missing API key. Send your TokenGate key as 'Authorization: Bearer <key>' or "
            "'X-API-Key: <key>'.",
        ),
        answers.expired_key(OPENAI, "old", "2026-01-01T00:00:00Z"): (
            401,
            "invalid_api_key",
            "This API key ('old') expired at 2026-01-01T00:00:00Z. Ask the gateway's operator "
            "for a new one.",
        ),
        answers.conflicting_keys(OPENAI, ["X-API-Key", "Authorization"]): (
            401,
            "invalid_api_key",
            "Different API keys were sent in X-API-Key, Authorization. Send your TokenGate key "
            "once, or the same key in each.",
        ),
        answers.endpoint_not_allowed(OPENAI, "POST", "/p/files"): (
            403,
            "endpoint_not_allowed",
            "POST /p/files is not available through this gateway: it serves the "
            "chat/completions, completions, embeddings and responses endpoints and the model "
            "list.",
        ),
        answers.unreadable_body(OPENAI, "it is not valid JSON"): (
            400,
            None,
            "We could not parse the JSON body of your request: it is not valid JSON.",
        ),
        answers.unknown_context(OPENAI, "/P/chat?x=1?y", ["/a", "/p"]): (
            404,
            "unknown_url",
            "No TokenGate proxy serves /P/chat; the gateway's proxies are at /a, /p. The request "
            "was not forwarded.",
        ),
    }
    for answer, (status, code, message) in cases.items():
        error = error_of(answer)
        assert answer.status_code == status
        assert (error["type"], error["code"], error["param"]) == (
            "invalid_request_error",
            code,
            None,
        )
        assert error["message"] == message
        if status == 401:
            assert answer.headers["WWW-Authenticate"] == 'Bearer realm="tokengate"'
        else:
            assert "WWW-Authenticate" not in answer.headers


def test_usage_unavailable_asks_to_retry_shortly():
    answer = answers.usage_unavailable(OPENAI)
    error = error_of(answer)
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
    assert (error["type"], error["code"]) == ("server_error", None)
    assert error["message"] == "The usage store is unreachable; try again shortly."


def test_usage_report_is_the_callers_standing_with_its_headers():
    proxy = type("P", (), {"name": "p", "scope": "key"})()
    hour = limit("total_tokens", 1000, 3600, "1h")
    statuses = (LimitStatus(TOTAL_100, 60, 10, 1070.5), LimitStatus(hour, 70, 0, 4600.25))
    answer = answers.usage_report(proxy, "alice", statuses, NOW)
    assert answer.status_code == 200
    assert answer.headers[answers.SOURCE_HEADER] == "gateway"
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers["X-RateLimit-Remaining"] == "30"  # the tightest window leads
    body = json.loads(answer.content)
    assert (body["object"], body["proxy"], body["key"], body["scope"]) == (
        "tokengate.usage",
        "p",
        "alice",
        "key",
    )
    assert body["limits"] == [
        {
            "name": "total_tokens-1m",
            "dimension": "total_tokens",
            "limit": 100,
            "window_seconds": 60,
            "used": 60,
            "reserved": 10,
            "remaining": 30,
            "reset": 1071,
            "reset_in_seconds": 51,
        },
        {
            "name": "total_tokens-1h",
            "dimension": "total_tokens",
            "limit": 1000,
            "window_seconds": 3600,
            "used": 70,
            "reserved": 0,
            "remaining": 930,
            "reset": 4601,
            "reset_in_seconds": 3581,
        },
    ]


# --------------------------------------------------------------------------------------------
# Budgets, model filters and scopes

BUDGET_5 = Limit(BUDGET, 5_000_000, 86400, "1d")
TEAM_O4 = Limit("total_tokens", 100, 60, "1m", models=("o4-*",), scope="proxy")


def test_a_spent_budget_is_insufficient_quota_with_what_is_left_and_no_retry():
    spent = [Charge(1000.25, 4_999_000, True)]
    decision = decide([(Bucket("p:k", BUDGET_5), spent)], Demand(1000, 0, RATES), NOW)
    answer = answers.rate_limited(OPENAI, decision, NOW, PROXY, Demand(1000, 0, RATES))
    error = json.loads(answer.content)["error"]
    assert answer.status_code == 429
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert error["message"] == (
        "Budget reached for proxy 'p': USD per 1d (usd-1d) of $5.000000, $0.001000 left, this "
        "request needs $0.002500. It refills enough in 23h59m40.25s."
    )
    assert answer.headers["x-should-retry"] == "false"  # hours away: past what SDKs wait
    assert answer.headers["X-RateLimit-Quota"] == "usd-1d"
    assert answer.headers["X-TokenGate-Budget-Remaining"] == "0.001000"
    assert "X-RateLimit-Limit" not in answer.headers  # micro-dollars are not a token limit


def test_a_refusal_names_the_limits_model_filter_and_scope():
    spent = [Charge(1000.25, 100, True)]
    decision = decide([(Bucket("p:*", TEAM_O4), spent)], Demand(5, 0), NOW)
    answer = answers.rate_limited(OPENAI, decision, NOW, PROXY, Demand(5, 0))
    error = json.loads(answer.content)["error"]
    assert answer.headers["X-RateLimit-Quota"] == "total_tokens-1m[o4-*]@proxy"
    assert (
        "on total tokens per 1m (total_tokens-1m[o4-*]@proxy) for models o4-*, shared by "
        in (error["message"])
    )
    assert error["code"] == "rate_limit_exceeded"


def test_budget_headers_show_the_tightest_budget_and_tokens_their_own():
    statuses = (
        LimitStatus(BUDGET_5, 1_000_000, 0, 2000.0),
        LimitStatus(Limit(BUDGET, 1_500_000, 3600, "1h"), 1_000_000, 250, 1500.2),
        LimitStatus(TOTAL_100, 10, 0, 1080.0),
    )
    headers = answers.ratelimit_headers(statuses, NOW)
    assert headers["X-TokenGate-Budget-Remaining"] == "0.499750"
    assert headers["X-TokenGate-Budget-Reset"] == "1501"
    # Money and tokens are not compared: the token headers describe the token limit.
    assert (headers["X-RateLimit-Limit"], headers["x-ratelimit-remaining-tokens"]) == ("100", "90")


def test_a_model_outside_the_allow_list_is_403_naming_the_patterns():
    proxy = SimpleNamespace(name="p", models=("gpt-4o*", "o4-mini"))
    answer = answers.model_not_allowed(OPENAI, "o3", proxy)
    error = json.loads(answer.content)["error"]
    assert answer.status_code == 403 and error["code"] == "model_not_allowed"
    assert "allows gpt-4o*, o4-mini" in error["message"]


def test_a_model_without_a_price_under_a_budget_is_refused_naming_it_and_prices():
    answer = answers.unpriced(OPENAI, "p", "my-llama")
    error = json.loads(answer.content)["error"]
    assert answer.status_code == 403
    assert "'my-llama' has no known price" in error["message"] and "`prices:`" in error["message"]
    streamed = json.loads(answers.unpriced(OPENAI, "p", None).content)["error"]["message"]
    assert "model is not known when the gate must decide" in streamed
