"""The Metrics addon inside mitmproxy's test harness: what each flow adds, the levels read at
each scrape, the option, the key bound and the expiry of keys that are gone. Every figure is
read from the page its real server serves, parsed with prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import httpx
import pytest
from mitmproxy import ctx, exceptions
from mitmproxy.test import tutils
from prometheus_client.parser import text_string_to_metric_families
from tokengate_core import metrics as metrics_module
from tokengate_core import notes
from tokengate_core.gate import Gate
from tokengate_core.metrics import EXPIRY_SECONDS, OTHER, Metrics, parse_address
from tokengate_core.probes import Probes
from tokengate_core.settings import Settings

from tests.addon.test_metering import HELLO_PROMPT, chat, queued, sent_upstream, settle
from tests.addon.test_store_outage import FlakyStore
from tests.support.harness import gate_in_harness, reverse_flow, through
from tests.support.processes import write_quotas
from tests.support.quotas import ALICE, BOB, key_entries

REQUEST_HOOKS = ("requestheaders", "request")
RESPONSE_HOOKS = ("responseheaders", "response")
LOOPBACK = "127.0.0.1:0"


def two_keys(extra: str = "", keys: str | None = None) -> str:
    return (
        "  p:\n    context: /p\n    provider: mock\n"
        "    token_limits:\n      total_tokens:\n        - {count: 1000, duration: 1m}\n"
        f"{extra}    keys:\n" + (keys or key_entries(alice=ALICE, bob=BOB))
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def served(tmp_path, monkeypatch, clock):
    """A gate with metrics served on a free loopback port: (tctx, gate, addons, metrics)."""
    with gate_in_harness(tmp_path, monkeypatch, two_keys(), Gate(clock=clock)) as (tctx, gate, a):
        metrics = metrics_of(a)
        tctx.configure(metrics, tokengate_metrics=LOOPBACK)
        yield tctx, gate, a, metrics


def metrics_of(addons) -> Metrics:
    (metrics,) = [addon for addon in addons if isinstance(addon, Metrics)]
    return metrics


def scrape(metrics: Metrics) -> list:
    """Every sample of the served page: (name, labels, value)."""
    page = httpx.get(metrics.server.url, timeout=5).text
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    ]


def value(samples: list, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
    return sum(
        v for n, found, v in samples if n == name and labels.items() <= found.items()
    )  # fmt: skip


def answered(prompt: int, completion: int) -> tutils.tresp:
    body = {"usage": {"prompt_tokens": prompt, "completion_tokens": completion}}
    return tutils.tresp(content=json.dumps(body).encode())


async def admitted_and_answered(addons, response, key=ALICE, **body) -> object:
    flow = reverse_flow(key=key, body=chat(**body))
    await through(addons, REQUEST_HOOKS, flow)
    assert flow.response is None
    flow.response = response
    await through(addons, RESPONSE_HOOKS, flow)
    return flow


@pytest.mark.parametrize(
    ("text", "address"),
    [("", None), ("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:0", ("::1", 0))],
)
def test_addresses(text, address):
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["bogus", "127.0.0.1", ":9464", "h:99999", "h:-1", "[::1]:x"])
def test_a_bad_address_is_refused_at_start_and_live(gate_addons, caplog, text):
    tctx, gate, addons = gate_addons
    metrics = metrics_of(addons)
    caplog.set_level(logging.ERROR, "tokengate")
    tctx.configure(metrics, tokengate_metrics=text)  # at start-up: one clear line
    assert any("refusing to start: tokengate_metrics" in r.message for r in caplog.records)
    tctx.configure(metrics, tokengate_metrics="")
    metrics.running()
    with pytest.raises(exceptions.OptionsError, match="is not HOST:PORT"):
        tctx.configure(metrics, tokengate_metrics=text)
    assert metrics.server is None and type(gate.probes) is Probes
    with pytest.raises(exceptions.OptionsError, match="0 or more"):
        tctx.configure(metrics, tokengate_metrics_keys=-1)


async def test_each_flow_is_counted_by_decision_source_and_usage(served, clock):
    _, _, addons, metrics = served
    ok = reverse_flow(body=chat(max_tokens=50))
    await through(addons, REQUEST_HOOKS, ok)
    notes.of(ok)["cost_micro_usd"] = 1_250  # as the budgets note a call's price
    ok.response = answered(HELLO_PROMPT, 40)
    await through(addons, RESPONSE_HOOKS, ok)
    estimated = reverse_flow(body=chat(max_tokens=5))
    await through(addons, REQUEST_HOOKS, estimated)
    notes.of(estimated)["cost_micro_usd"] = 750
    estimated.response = tutils.tresp(content=b'{"choices": [{"message": {"content": "Hi"}}]}')
    await through(addons, RESPONSE_HOOKS, estimated)
    failing = reverse_flow(body=chat(max_tokens=5))
    await through(addons, REQUEST_HOOKS, failing)
    failing.response = tutils.tresp(status_code=500, content=b'{"error": {}}')
    await through(addons, RESPONSE_HOOKS, failing)
    unknown = reverse_flow(key=None)
    await through(addons, (*REQUEST_HOOKS, *RESPONSE_HOOKS), unknown)
    spender = await admitted_and_answered(addons, answered(HELLO_PROMPT, 2000))
    assert notes.of(spender)["usage"]["total_tokens"] > 1000
    refused = reverse_flow(body=chat(max_tokens=5))
    await through(addons, (*REQUEST_HOOKS, *RESPONSE_HOOKS), refused)
    assert refused.response.status_code == 429
    await through(addons, ("error",), ok)  # a stream its caller cuts ends in error: once

    samples = scrape(metrics)
    requests = "tokengate_requests_total"
    alice = {"proxy": "p", "key": "alice"}
    assert value(samples, requests, **alice, decision="admitted", source="provider") == 4
    assert value(samples, requests, **alice, status="500", source="provider") == 1
    assert value(samples, requests, proxy="p", key="", decision="unauthorized") == 1
    assert value(
        samples, requests, **alice, decision="refused", limit="total_tokens-1m", source="gate"
    ) == 1  # fmt: skip
    assert value(samples, requests) == 6
    tokens = "tokengate_tokens_total"
    completion = {"dimension": "completion", "usage_source": "reported"}
    assert value(samples, tokens, **alice, **completion) == 40 + 2000
    assert value(samples, tokens, **alice, dimension="completion", usage_source="estimated") == 1
    assert value(samples, "tokengate_spend_usd_total", **alice) == pytest.approx(0.002)
    usage = "gen_ai_client_token_usage_sum"
    genai = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "openai"}
    assert value(samples, usage, **genai, gen_ai_token_type="input") == 3 * HELLO_PROMPT
    assert value(samples, usage, **genai, gen_ai_request_model="gpt-4o-mini") == (
        3 * HELLO_PROMPT + 40 + 1 + 2000
    )
    ratio = "tokengate_prompt_estimate_ratio"
    assert value(samples, ratio + "_count") == 2 and value(samples, ratio + "_sum") == 2.0
    overhead = "tokengate_overhead_seconds_count"
    assert value(samples, overhead, proxy="p", source="provider") == 4
    assert value(samples, overhead, proxy="p", source="gate") == 2
    assert value(samples, "tokengate_store_call_seconds_count", outcome="ok") > 0
    assert value(samples, "tokengate_reservations_in_flight") == 0
    assert value(samples, "tokengate_quota_limit", proxy="p", limit="total_tokens-1m") == 1000
    assert value(samples, "tokengate_quota_remaining", **alice) == 0
    # A window whose duration has passed since the key's last answer is whole again.
    clock.now += 60
    assert value(scrape(metrics), "tokengate_quota_remaining", **alice) == 1000


async def test_a_teams_window_is_its_own_gauge_beside_each_keys(tmp_path, monkeypatch):
    """A key's limit and its team's (`scope: proxy` on one limit) are each exported under
    whose window it is: the key's under its name, the team's under '*', whichever key spent."""
    team = "        - {count: 5000, duration: 1h, scope: proxy}\n"
    quotas = two_keys().replace("duration: 1m}\n", "duration: 1m}\n" + team)
    with gate_in_harness(tmp_path, monkeypatch, quotas) as (tctx, _, addons):
        metrics = metrics_of(addons)
        tctx.configure(metrics, tokengate_metrics=LOOPBACK)
        await admitted_and_answered(addons, answered(HELLO_PROMPT, 100))
        await admitted_and_answered(addons, answered(HELLO_PROMPT, 200), key=BOB)
        samples = scrape(metrics)
    remaining = "tokengate_quota_remaining"
    assert value(samples, remaining, key="alice", limit="total_tokens-1m") == 900 - HELLO_PROMPT
    assert value(samples, remaining, key="bob", limit="total_tokens-1m") == 800 - HELLO_PROMPT
    team = {"key": "*", "limit": "total_tokens-1h@proxy"}
    assert value(samples, remaining, **team) == 4700 - 2 * HELLO_PROMPT
    assert value(samples, remaining, key="alice", limit="total_tokens-1h@proxy") == 0


async def test_the_store_going_away_and_coming_back(tmp_path, monkeypatch):
    extra = "    fail: closed\n"
    with gate_in_harness(tmp_path, monkeypatch, two_keys(extra) + "store: {kind: memory}\n") as (
        tctx,
        gate,
        addons,
    ):
        metrics = metrics_of(addons)
        tctx.configure(metrics, tokengate_metrics=LOOPBACK)
        gate.store = FlakyStore(gate.clock)
        await admitted_and_answered(addons, answered(HELLO_PROMPT, 1))
        await gate.writes.caught_up()  # its settlement written before the store goes
        gate.store.down = True
        refused = reverse_flow()
        await through(addons, (*REQUEST_HOOKS, *RESPONSE_HOOKS), refused)
        assert refused.response.status_code == 503
        down = scrape(metrics)
        assert value(down, "tokengate_store_up", store="memory") == 0
        assert value(down, "tokengate_requests_total", decision="unavailable", status="503") == 1
        unavailable = "tokengate_store_call_seconds_count"
        assert value(down, unavailable, operation="reserve", outcome="unavailable") == 1
        gate.store.down = False
        await admitted_and_answered(addons, answered(HELLO_PROMPT, 1))
        back = scrape(metrics)
        assert value(back, "tokengate_store_up") == 1
        assert value(back, "tokengate_requests_total") == 3  # nothing lost meanwhile


async def test_queue_waits_and_requests_in_flight(make_gate):
    _, addons, _ = make_gate(count=100, extra="    queue_wait: 5s\n")
    metrics = metrics_of(addons)
    assert metrics.server is None  # off by default
    ctx.options.update(tokengate_metrics=LOOPBACK)
    first = await sent_upstream(addons, chat(max_tokens=91))  # holds all 100
    second = reverse_flow(body=chat(max_tokens=10))
    waiting = asyncio.create_task(through(addons, REQUEST_HOOKS, second))
    await queued(metrics, waiting)
    samples = scrape(metrics)
    assert value(samples, "tokengate_queue_waiting") == 1
    assert value(samples, "tokengate_reservations_in_flight") == 1
    await settle(addons, first, completion=5)
    await asyncio.wait_for(waiting, 2)
    samples = scrape(metrics)
    assert value(samples, "tokengate_queue_wait_seconds_count", outcome="admitted") == 1
    assert value(samples, "tokengate_queue_waiting") == 0
    assert value(samples, "tokengate_reservations_in_flight") == 1  # the second, now admitted
    await metrics.done()


async def test_counters_survive_a_reload_and_a_revoked_key_expires(served, tmp_path, clock):
    _, gate, addons, metrics = served
    await admitted_and_answered(addons, answered(HELLO_PROMPT, 10))
    await admitted_and_answered(addons, answered(HELLO_PROMPT, 10), key=BOB)
    # bob is revoked: the file is rewritten without him, and the gate reloads it.
    write_quotas(
        gate.config.path, "http://upstream.test:8000", two_keys(keys=key_entries(alice=ALICE))
    )
    settings = next(addon for addon in addons if isinstance(addon, Settings))
    assert await settings.reload("test")
    await admitted_and_answered(addons, answered(HELLO_PROMPT, 10))
    metrics.sweep()  # bob is noticed gone now
    samples = scrape(metrics)
    assert value(samples, "tokengate_requests_total", key="alice") == 2  # not reset
    assert value(samples, "tokengate_requests_total", key="bob") == 1  # kept a while
    clock.now += EXPIRY_SECONDS - 1
    metrics.sweep()
    assert value(scrape(metrics), "tokengate_tokens_total", key="bob") == 10 + HELLO_PROMPT
    clock.now += 1
    metrics.sweep()
    samples = scrape(metrics)
    assert not [s for s in samples if s[1].get("key") == "bob"]  # every series of bob's
    assert value(samples, "tokengate_requests_total", key="alice") == 2
    assert value(samples, "gen_ai_client_token_usage_count", gen_ai_token_type="input") == 3


async def test_keys_and_models_beyond_the_bounds_share_one_series(served, monkeypatch):
    tctx, _, addons, metrics = served
    tctx.configure(metrics, tokengate_metrics_keys=1)
    monkeypatch.setattr(metrics_module, "MAX_MODELS", 1)
    await admitted_and_answered(addons, answered(HELLO_PROMPT, 10))
    await admitted_and_answered(addons, answered(HELLO_PROMPT, 500), key=BOB, model="gpt-x")
    samples = scrape(metrics)
    assert value(samples, "tokengate_requests_total", model="gpt-4o-mini") == 1
    assert value(samples, "tokengate_requests_total", model=OTHER) == 1
    bound = len(metrics._series)
    await admitted_and_answered(addons, answered(HELLO_PROMPT, 1), key=BOB, model="gpt-y")
    assert len(metrics._series) == bound  # a caller's model names cannot grow the gate's memory
    assert value(samples, "tokengate_requests_total", key="alice") == 1
    assert value(samples, "tokengate_requests_total", key=OTHER) == 1
    assert not [s for s in samples if s[1].get("key") == "bob" and "requests" in s[0]]
    # The gauge shows the key with the least left, and says how many it leaves out.
    remaining = [s for s in samples if s[0] == "tokengate_quota_remaining"]
    assert [(s[1]["key"], s[2]) for s in remaining] == [("bob", 1000 - HELLO_PROMPT - 500)]
    assert value(samples, "tokengate_quota_keys_omitted") == 1


async def test_ledger_lines_lost_are_counted_across_ledgers(served, tmp_path):
    tctx, _, addons, metrics = served
    reporting = metrics.reporting
    unwritable = tmp_path / "a-folder"
    unwritable.mkdir()
    tctx.configure(reporting, tokengate_ledger=str(unwritable))  # a folder: cannot be opened
    await admitted_and_answered(addons, answered(HELLO_PROMPT, 1))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while metrics.levels.ledger_lost() < 1 and loop.time() < deadline:
        await asyncio.sleep(0.02)
    tctx.configure(reporting, tokengate_ledger=str(tmp_path / "ledger.jsonl"))
    assert value(scrape(metrics), "tokengate_ledger_lines_dropped_total") == 1


async def test_moved_and_stopped_cleanly_keeping_the_counts(served):
    tctx, gate, addons, metrics = served
    await admitted_and_answered(addons, answered(HELLO_PROMPT, 1))
    first = metrics.server.url
    tctx.configure(metrics, tokengate_metrics="127.0.0.1:0")  # the same: nothing changes
    assert metrics.server.url == first
    tctx.configure(metrics, tokengate_metrics="localhost:0")
    assert metrics.server.url != first
    assert value(scrape(metrics), "tokengate_requests_total") == 1
    assert await asyncio.to_thread(_gone, first)  # the old server stops behind
    moved = metrics.server.url
    await metrics.done()
    assert metrics.server is None and type(gate.probes) is Probes
    assert _gone(moved, seconds=0)  # done: stopped before it returns


def _gone(url: str, seconds: float = 3) -> bool:
    """Whether nothing listens at `url` any more, within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            httpx.get(url, timeout=1)
        except httpx.ConnectError:
            return True
        except httpx.TransportError:
            pass  # accepted while it closed, then reset: ask again
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


async def test_a_taken_address_is_refused_live_and_the_old_one_kept(served):
    tctx, _, addons, metrics = served
    metrics.running()
    await admitted_and_answered(addons, answered(HELLO_PROMPT, 1))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(exceptions.OptionsError, match="cannot listen"):
            tctx.configure(metrics, tokengate_metrics=f"127.0.0.1:{port}")
    # mitmproxy put the old value back, and it is served again (port 0: any free one).
    assert ctx.options.tokengate_metrics == LOOPBACK and metrics.server is not None
    assert value(scrape(metrics), "tokengate_requests_total") == 1
    await metrics.done()
