"""End to end: usage that survives a restart (SQLite); one quota shared by two gateways (Redis,
Redis Cluster); a Redis outage and a cluster master failing over under each `fail` policy."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis
from redis.crc import key_slot
from tokengate_core.config import load_config
from tokengate_core.quota import buckets_for
from tokengate_core.stores import open_store

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


def redis_quotas(path, mock_url: str, store: str, count: int) -> None:
    """Two proxies on one Redis store (`store`, its YAML entry): `strict` fails closed, `lenient`
    fails open; each has one caller key, named as the proxy."""
    proxies = "".join(
        f"  {name}:\n    context: /{name}\n    provider: mock\n    fail: {fail}\n"
        f"    token_limits:\n      total_tokens:\n        - {{count: {count}, duration: 1m}}\n"
        "    keys:\n" + key_entries(**{name: CALLERS[name]})
        for name, fail in (("strict", "closed"), ("lenient", "open"))
    )
    write_quotas(path, mock_url, proxies + store)


def redis_store(url: str, cluster: bool = False, seeds: Sequence[str] = ()) -> str:
    """The `store:` entry of a Redis server, or of a Redis Cluster through `url` and `seeds`."""
    more = ", cluster: true" if cluster else ""
    if seeds:
        more += f", cluster_nodes: [{', '.join(seeds)}]"
    return f"store: {{kind: redis, url: '{url}'{more}}}\n"


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


@pytest.fixture(params=("redis", "redis-cluster"))
def empty_redis(request) -> str:
    """The `store:` entry of an empty Redis: a server of the test's own, or the session's
    cluster."""
    if request.param == "redis":
        return redis_store(request.getfixturevalue("own_redis").url)
    return redis_store(request.getfixturevalue("redis_cluster").url, cluster=True)


def test_two_gateways_on_one_redis_share_one_limit(tmp_path, fresh_mock, empty_redis):
    budget = 500
    config = tmp_path / "quotas.yaml"
    redis_quotas(config, fresh_mock.url, empty_redis, budget)
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


def test_two_gateways_keep_a_team_budget_through_a_cluster(tmp_path, fresh_mock, redis_cluster):
    """A proxy with a key's token limit, the team's and a budget: each request's windows, its
    key's and its team's, in one slot (tagged by the proxy), so one script reserves them all; a
    burst of two keys through two gateways stays within the budget, every answer priced."""
    usd_per_token = 0.001  # prices: 1000 USD per 1M tokens, so a cent is ten tokens
    proxies = (
        "  team:\n    context: /team\n    provider: mock\n"
        "    token_limits:\n      total_tokens:\n        - {count: 100000, duration: 1m}\n"
        "        - {count: 200000, duration: 1m, scope: proxy}\n"
        "    budgets:\n      - {usd: 0.5, duration: 1d, scope: proxy}\n"
        "    keys:\n" + key_entries(alice=ALICE, bob=BOB)
    )
    store = redis_store(redis_cluster.url, cluster=True)
    config = write_quotas(tmp_path / "quotas.yaml", fresh_mock.url, proxies + store)
    prices = "prices:\n  gpt-4o-mini: {input: 1000, output: 1000}\n"
    config.write_text(prices + config.read_text(encoding="utf-8"), encoding="utf-8")
    gateways = [start(config, fresh_mock), start(config, fresh_mock)]

    def send(i: int) -> httpx.Response:
        return httpx.post(
            f"{gateways[i % 2].url}/team/chat/completions",
            json={**HELLO, "max_tokens": 20},
            headers={"Authorization": f"Bearer {(ALICE, BOB)[i // 2 % 2]}"},
            timeout=30,
        )

    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(send, range(48)))
    finally:
        for gateway in gateways:
            gateway.stop()
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) == {200, 429}, statuses
    refused = {a.headers["X-RateLimit-Quota"] for a in answers if a.status_code == 429}
    assert refused == {"usd-1d@proxy"}
    served = fresh_mock.stats()["tokens_served"]["total"]
    costs = [float(a.headers["X-TokenGate-Cost"]) for a in answers if a.status_code == 200]
    assert sum(costs) == pytest.approx(served * usd_per_token, abs=1e-6)
    assert served * usd_per_token <= 0.5
    with redis.RedisCluster.from_url(redis_cluster.url, decode_responses=True) as client:
        keys = list(client.scan_iter("tokengate:*"))
    windows = [key for key in keys if "{team}" in key]
    assert len(windows) == 2 + 1 + 1  # each key's token window, the team's, the budget
    assert len({key_slot(key.encode()) for key in windows}) == 1


def test_redis_outage_fail_closed_and_open_then_accounting_resumes(tmp_path, fresh_mock, own_redis):
    config = tmp_path / "quotas.yaml"
    redis_quotas(config, fresh_mock.url, redis_store(own_redis.url), 1000)
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


def test_cluster_master_failing_over_under_traffic(tmp_path, fresh_mock, redis_cluster):
    """A master of the cluster killed while both proxies send requests, until its replica has
    taken over: `strict` answers 503 meanwhile and `lenient` admits unmetered, nothing reaches
    the provider unanswered, and afterwards every window holds exactly what the metered
    requests cost, with no reservation left behind."""
    slot = key_slot(b"strict")
    victim = redis_cluster.master_of(slot)
    # Both proxies' windows on the master that fails (the hash tag is the proxy's name).
    assert redis_cluster.master_of(key_slot(b"lenient")) is victim
    config = tmp_path / "quotas.yaml"
    seeds = [f"127.0.0.1:{node.port}" for node in redis_cluster.nodes[1:]]  # the first may fail
    store = redis_store(redis_cluster.url, cluster=True, seeds=seeds)
    redis_quotas(config, fresh_mock.url, store, 10**6)
    gateway = start(config, fresh_mock)
    seen: list[tuple[str, float, httpx.Response]] = []
    stop = threading.Event()

    def traffic(proxy: str) -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            answer = post(gateway, proxy, {**HELLO, "max_tokens": 5})
            seen.append((proxy, time.monotonic(), answer))

    def answered(proxy: str, since: float = 0.0) -> list[httpx.Response]:
        return [a for name, at, a in list(seen) if name == proxy and at > since]

    def metered_since(since: float) -> int:
        """The fewest metered answers either proxy got since `since`."""
        return min(sum(map(metered, answered(proxy, since))) for proxy in CALLERS)

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            running = [pool.submit(traffic, proxy) for proxy in ("strict", "lenient") * 2]
            try:
                assert wait_until(lambda: metered_since(0) >= 3, 20)
                victim.process.popen.kill()
                victim.stop()
                assert wait_until(lambda: "degraded" in accounting_of(answered("lenient")), 20)
                assert wait_until(lambda: redis_cluster.master_of(slot) is not victim, 20)
                promoted = time.monotonic()
                assert wait_until(lambda: metered_since(promoted) >= 3, 20)
            finally:
                stop.set()
            for done in running:
                done.result()  # a call that raised fails the test here
        strict, lenient = answered("strict"), answered("lenient")
        assert {a.status_code for a in strict} == {200, 503}
        assert {a.status_code for a in lenient} == {200}
        assert "degraded" not in accounting_of(strict)
        for answer in strict:
            if answer.status_code == 503:
                assert answer.json()["error"]["code"] == "quota_store_unavailable"
        assert fresh_mock.stats()["authorized"] == sum(a.status_code == 200 for _, _, a in seen)
        unpriced = [
            dict(a.headers)
            for _, _, a in seen
            if metered(a) and "X-Tokens-Consumed" not in a.headers
        ]
        assert not unpriced, unpriced[:2]  # every metered answer says what it cost
        charged = {p: sum(int(a.headers["X-Tokens-Consumed"]) for a in answered(p) if metered(a))
                   for p in CALLERS}  # fmt: skip
        # The settlements kept through the outage are written once the store is back, and the
        # reserves whose replies were lost are released: nothing is still held.
        books = {proxy: (tokens, 0) for proxy, tokens in charged.items()}
        assert wait_until(lambda: windows(config) == books), (windows(config), books)
    finally:
        gateway.stop()
        if victim.process is None:
            victim.start()  # it rejoins as a replica of the node promoted in its place
        redis_cluster.wait_ok()


def metered(answer: httpx.Response) -> bool:
    """Admitted and charged (not admitted unmetered while the store was down)."""
    return answer.status_code == 200 and "X-TokenGate-Accounting" not in answer.headers


def accounting_of(answers: list[httpx.Response]) -> set[str]:
    """The `X-TokenGate-Accounting` values among `answers`."""
    return {a.headers.get("X-TokenGate-Accounting", "") for a in answers}


def windows(config) -> dict[str, tuple[int, int]]:
    """(used, reserved) of each proxy's one window, read from the store the gateway uses."""
    quotas = load_config(config, check_credentials=False)

    async def read() -> dict[str, tuple[int, int]]:
        store = open_store(quotas.store, time.time)
        try:
            found = {}
            for proxy in quotas.proxies.values():
                (key,) = (stored.name for stored in proxy.keys)
                (status,) = await store.status(buckets_for(proxy, key))
                found[proxy.name] = (status.used, status.reserved)
            return found
        finally:
            await store.close()

    return asyncio.run(read())
