"""End to end: usage that survives a restart (SQLite); one quota shared by two gateways (Redis)."""

from __future__ import annotations

import contextlib
import threading

import httpx

from tests.conftest import ALICE
from tests.e2e import Gateway, wait_until, write_quotas
from tests.test_e2e_gateway import HELLO, call, proxy_yaml


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
