"""End to end: usage that survives a restart (SQLite); one quota shared by two gateways (Redis)."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support.calls import HELLO, call
from tests.support.processes import Gateway, wait_until, write_quotas
from tests.support.quotas import ALICE, BOB, key_entries, proxy_yaml
from tests.support.redis_server import RedisServer, require_redis_server


def start(config, mock) -> Gateway:
    return Gateway.start(config, f"reverse:{mock.url}")


def test_restart_mid_window_keeps_the_spent_budget(tmp_path, fresh_mock):
    config = write_quotas(tmp_path / "quotas.yaml", fresh_mock.url, proxy_yaml(count=30))
    gateway = start(config, fresh_mock)
    try:
        first = call(gateway, ALICE)
        assert first.status_code == 200, first.text
        refused = call(gateway, ALICE)
        assert refused.status_code == 429
    finally:
        gateway.stop()
    assert (tmp_path / ".state" / "tokengate.sqlite3").exists()  # the default store

    restarted = start(config, fresh_mock)
    try:
        again = call(restarted, ALICE)
        assert again.status_code == 429, "a restart must not reset a quota"
        assert again.headers["X-RateLimit-Reset"] == refused.headers["X-RateLimit-Reset"]
        assert fresh_mock.stats()["authorized"] == 1
    finally:
        restarted.stop()


def test_reservation_of_a_crashed_gateway_is_charged_once(tmp_path, fresh_mock):
    """Killed while a request is at the provider: its reservation stays charged, at the amount
    reserved, after `reservation_timeout`; nothing is lost and nothing is charged twice."""
    proxies = proxy_yaml(count=1000) + "store: {kind: sqlite, reservation_timeout: 1s}\n"
    config = write_quotas(tmp_path / "quotas.yaml", fresh_mock.url, proxies)
    gateway = start(config, fresh_mock)
    body = {**HELLO, "max_tokens": 50}
    slow = threading.Thread(target=_call_until_killed, args=(gateway, body), daemon=True)
    slow.start()
    assert wait_until(lambda: fresh_mock.stats()["requests"] == 1, timeout=10)
    gateway.process.popen.kill()  # no shutdown hooks: the process is simply gone
    gateway.process.popen.wait(10)
    slow.join(10)

    restarted = start(config, fresh_mock)
    try:
        probe = call(restarted, ALICE, body={**HELLO, "max_tokens": 1})
        assert probe.status_code == 200
        reserved = 9 + 50  # prompt estimate of HELLO for gpt-4o-mini + max_tokens
        own = probe.json()["usage"]["total_tokens"]
        assert int(probe.headers["X-RateLimit-Remaining"]) == 1000 - reserved - own
    finally:
        restarted.stop()


def _call_until_killed(gateway: Gateway, body: dict) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the gateway is killed under this request
        call(gateway, ALICE, body=body, **{"X-Mock-Mode": "slow", "X-Mock-Delay": "5"})


def redis_quotas(path, mock_url: str, redis_url: str, count: int) -> None:
    """Two proxies on one Redis store: `strict` fails closed, `lenient` fails open."""
    proxies = "".join(
        f"  {name}:\n    context: /{name}\n    provider: mock\n    fail: {fail}\n"
        f"    token_limits:\n      total_tokens:\n        - {{count: {count}, duration: 1m}}\n"
        "    keys:\n" + key_entries(**{name: CALLERS[name]})
        for name, fail in (("strict", "closed"), ("lenient", "open"))
    )
    write_quotas(path, mock_url, proxies + f"store: {{kind: redis, url: '{redis_url}'}}\n")


CALLERS = {"strict": ALICE, "lenient": BOB}  # a secret belongs to one proxy only


def post(gateway: Gateway, proxy: str, body: dict) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/{proxy}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {CALLERS[proxy]}"},
        timeout=30,
    )


@pytest.fixture
def own_redis():
    """A Redis server of this test's own, which it may stop and start again."""
    server = RedisServer(require_redis_server()).start()
    yield server
    server.stop()


def test_two_gateways_on_one_redis_share_one_limit(tmp_path, fresh_mock, own_redis):
    budget = 500
    config = tmp_path / "quotas.yaml"
    redis_quotas(config, fresh_mock.url, own_redis.url, budget)
    gateways = [start(config, fresh_mock), start(config, fresh_mock)]
    try:
        body = {**HELLO, "max_tokens": 20}
        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(lambda i: post(gateways[i % 2], "strict", body), range(2 * 24)))
    finally:
        for gateway in gateways:
            gateway.stop()
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) == {200, 429}, statuses
    for half in (statuses[0::2], statuses[1::2]):  # each gateway admitted some of the burst
        assert 200 in half
    served = fresh_mock.stats()["tokens_served"]["total"]
    # One gateway alone would let ~17 of its 24 through; two counting apart, twice that.
    assert served <= budget, f"{served} tokens served on a {budget}-token limit"
    charged = sum(int(a.headers["X-Tokens-Consumed"]) for a in answers if a.status_code == 200)
    assert charged == served


def test_redis_outage_fail_closed_and_open_then_accounting_resumes(tmp_path, fresh_mock, own_redis):
    config = tmp_path / "quotas.yaml"
    redis_quotas(config, fresh_mock.url, own_redis.url, 1000)
    gateway = start(config, fresh_mock)
    try:
        for proxy in ("strict", "lenient"):
            before = post(gateway, proxy, HELLO)
            assert before.status_code == 200 and "X-TokenGate-Accounting" not in before.headers

        own_redis.stop()
        closed = post(gateway, "strict", HELLO)
        assert closed.status_code == 503
        assert closed.headers["X-TokenGate-Source"] == "gateway"
        assert closed.headers["Retry-After"] == "2"
        assert closed.json()["error"]["code"] == "quota_store_unavailable"
        served_before = fresh_mock.stats()["authorized"]
        for _ in range(3):
            opened = post(gateway, "lenient", HELLO)
            assert opened.status_code == 200, opened.text
            assert opened.headers["X-TokenGate-Accounting"] == "degraded"
        assert fresh_mock.stats()["authorized"] == served_before + 3  # strict sent nothing
        outage_lines = [line for line in gateway.process.lines if "usage store unavailable" in line]
        assert len(outage_lines) == 1, outage_lines  # once per outage, not per request

        own_redis.start()  # same port, empty: Redis here keeps nothing on disk
        for proxy in ("strict", "lenient"):
            after = post(gateway, proxy, HELLO)
            assert after.status_code == 200, after.text
            assert "X-TokenGate-Accounting" not in after.headers
            spent = int(after.headers["X-Tokens-Consumed"])
            assert int(after.headers["X-RateLimit-Remaining"]) == 1000 - spent
        assert wait_until(
            lambda: any("full accounting resumed" in line for line in gateway.process.lines)
        )
    finally:
        gateway.stop()
