"""Live configuration inside mitmproxy's test harness: the watcher, the reload and status commands,
usage kept across a reload, and key expiry."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re

import pytest
from mitmproxy.test import taddons
from tokengate_core import notes, pipeline
from tokengate_core.commands import status_report
from tokengate_core.config import load_config
from tokengate_core.gate import Gate
from tokengate_core.keys import format_timestamp
from tokengate_core.limiter import Demand, Usage
from tokengate_core.quota import buckets_for
from tokengate_core.settings import Settings

from tests.support.harness import reverse_flow, through
from tests.support.processes import PROVIDER_KEY, write_quotas
from tests.support.quotas import ALICE, BOB, key_entries

NOW = 1_800_000_000.0
REQUEST_HOOKS = ("requestheaders", "request")


def proxies(count: int = 1000, duration: str = "1m", keys: str | None = None) -> str:
    return (
        "  p:\n    context: /p\n    provider: mock\n"
        "    token_limits:\n      total_tokens:\n"
        f"        - {{count: {count}, duration: {duration}}}\n"
        "    keys:\n"
        + (keys if keys is not None else key_entries(alice=ALICE))
        + "store: {kind: memory}\n"
    )


def rewrite(path, text: str) -> None:
    """Replace the file by rename, as editors and scripts/keys.py do."""
    temp = path.with_name(path.name + ".new")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


@pytest.fixture
def quotas(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENGATE_TEST_PROVIDER_KEY", PROVIDER_KEY)
    return write_quotas(tmp_path / "quotas.yaml", "http://upstream.test:8000", proxies())


@pytest.fixture
def live(quotas, caplog):
    caplog.set_level(logging.INFO, logger="tokengate")
    clock = [NOW]
    gate = Gate(clock=lambda: clock[0])
    addons = pipeline.build(gate)
    with taddons.context(*addons) as tctx:
        tctx.configure(addons[0], tokengate_config=str(quotas))
        yield tctx, gate, addons, clock


def settings_of(addons) -> Settings:
    return next(a for a in addons if isinstance(a, Settings))


def commands_of(addons) -> Settings:
    return next(a for a in addons if isinstance(a, Settings))


async def eventually(predicate, seconds: float = 5.0) -> bool:
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


def count_of(gate: Gate) -> int:
    return gate.proxy("p").limits[0].count


async def test_reload_command_applies_a_valid_edit(live, quotas, caplog):
    tctx, gate, addons, _ = live
    rewrite(quotas, quotas.read_text().replace("count: 1000", "count: 400"))
    tctx.command(commands_of(addons).reload_now)
    assert await eventually(lambda: count_of(gate) == 400)
    summary = [r.getMessage() for r in caplog.records if "store memory" in r.getMessage()][-1]
    assert "p (/p -> mock, scope key, 400 total_tokens-1m, 1 key, fail closed)" in summary


async def test_invalid_edit_is_refused_with_line_and_old_config_serves(live, quotas, caplog):
    tctx, gate, addons, _ = live
    before = gate.config
    rewrite(quotas, quotas.read_text().replace("duration: 1m", "duration: 1w"))
    tctx.command(commands_of(addons).reload_now)
    refused = f"{quotas}:12: bad duration '1w'"
    assert await eventually(lambda: refused in caplog.text)
    assert "the last good configuration keeps serving" in caplog.text
    assert gate.config is before
    flow = reverse_flow()
    await through(addons, REQUEST_HOOKS, flow)
    assert not notes.answered_by_gate(flow)  # alice is still admitted under the old file


async def test_watcher_reloads_on_rename_and_in_place_edits_and_waits_out_a_missing_file(
    live, quotas, caplog, monkeypatch
):
    _, gate, addons, _ = live
    monkeypatch.setattr(Settings, "WATCH_INTERVAL", 0.02)
    monkeypatch.setattr(Settings, "SETTLE_SECONDS", 0.01)
    settings = settings_of(addons)
    settings.start_watching()
    try:
        rewrite(quotas, quotas.read_text().replace("count: 1000", "count: 500"))
        assert await eventually(lambda: count_of(gate) == 500)
        quotas.write_text(quotas.read_text().replace("count: 500", "count: 600"))  # in place
        assert await eventually(lambda: count_of(gate) == 600)
        text = quotas.read_text()
        quotas.unlink()
        assert await eventually(lambda: "is gone; the last good configuration" in caplog.text)
        assert count_of(gate) == 600
        quotas.write_text(text.replace("count: 600", "count: 700"))
        assert await eventually(lambda: count_of(gate) == 700)
        # An invalid edit is reported once, not on every look at the unchanged file.
        quotas.write_text(text.replace("provider: mock", "provider: nope"))
        assert await eventually(lambda: "provider 'nope' is not defined" in caplog.text)
        await asyncio.sleep(0.2)
        assert caplog.text.count("provider 'nope' is not defined") == 1
        assert count_of(gate) == 700
    finally:
        await settings.done()


async def spend(gate: Gate, total: int) -> None:
    """Charge alice's window `total` tokens, as a settled request would."""
    buckets = buckets_for(gate.proxy("p"), "alice")
    _, reservation = await gate.store.reserve("spent", buckets, Demand(1, 0))
    await gate.store.settle(reservation, Usage(total, 0))


async def test_spent_usage_survives_a_reload_and_a_lower_count_applies_to_it(live, quotas):
    _, gate, addons, _ = live
    await spend(gate, 600)
    admitted = reverse_flow()
    await through(addons, REQUEST_HOOKS, admitted)
    assert not notes.answered_by_gate(admitted)
    rewrite(quotas, quotas.read_text().replace("count: 1000", "count: 500"))
    await settings_of(addons).reload("test")
    refused = reverse_flow()
    await through(addons, REQUEST_HOOKS, refused)
    assert refused.response.status_code == 429
    message = json.loads(refused.response.content)["error"]["message"]
    assert "limit 500" in message
    assert int(re.search(r"used (\d+)", message).group(1)) >= 600  # plus what is in flight
    # Raising it again admits on the same window.
    rewrite(quotas, quotas.read_text().replace("count: 500", "count: 5000"))
    await settings_of(addons).reload("test")
    again = reverse_flow()
    await through(addons, REQUEST_HOOKS, again)
    assert not notes.answered_by_gate(again)


async def test_a_changed_duration_keeps_the_window(live, quotas):
    _, gate, addons, _ = live
    await spend(gate, 900)
    rewrite(quotas, quotas.read_text().replace("duration: 1m", "duration: 2m"))
    await settings_of(addons).reload("test")
    (status,) = await gate.store.status(buckets_for(gate.proxy("p"), "alice"))
    assert (status.limit.name, status.used, status.remaining) == ("total_tokens-2m", 900, 100)
    # A process that starts on the edited file (a restart, another gateway on the same store)
    # names the window the same: nothing about it lives in one process's memory.
    restarted = load_config(quotas).proxies["p"]
    assert [b.key for b in buckets_for(restarted, "alice")] == ["p:alice:total_tokens#0"]
    refused = reverse_flow(
        body={"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 2000}]}
    )
    await through(addons, REQUEST_HOOKS, refused)
    assert refused.response.status_code == 429  # the prompt alone no longer fits what is left


def windows(tmp_path, durations: str) -> dict[str, str]:
    """Limit name -> window, for proxy p with total_tokens limits of these durations."""
    items = "".join(f"        - {{count: 10, duration: {d}}}\n" for d in durations.split())
    proxies = (
        "  p:\n    context: /p\n    provider: mock\n    token_limits:\n      total_tokens:\n"
        + items
    )
    config = load_config(write_quotas(tmp_path / "quotas.yaml", "http://u.test", proxies))
    return {lim.name: lim.window for lim in config.proxies["p"].limits}


def test_windows_are_named_by_rank_within_their_dimension(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENGATE_TEST_PROVIDER_KEY", PROVIDER_KEY)
    assert windows(tmp_path, "1d 1m") == {
        "total_tokens-1d": "total_tokens#1",
        "total_tokens-1m": "total_tokens#0",
    }
    # Edited durations keep their rank, so each keeps its window; an added limit takes the
    # rank its duration gives it (shortest with shortest).
    assert windows(tmp_path, "1d 2m 1h") == {
        "total_tokens-2m": "total_tokens#0",
        "total_tokens-1h": "total_tokens#1",
        "total_tokens-1d": "total_tokens#2",
    }


async def test_status_logs_summary_and_live_usage_per_key(live, quotas, caplog):
    tctx, gate, addons, _ = live
    expired_at = NOW - 60
    keys = key_entries(alice=ALICE) + (
        f'      bob: {{sha256: "{"b" * 64}", expires: "{format_timestamp(expired_at)}"}}\n'
    )
    rewrite(quotas, quotas.read_text().replace(key_entries(alice=ALICE), keys))
    await settings_of(addons).reload("test")
    await spend(gate, 250)
    tctx.command(commands_of(addons).status)
    assert await eventually(lambda: "tokengate status:" in caplog.text)
    report = await status_report(gate)
    assert report.splitlines()[0].endswith(
        "1000 total_tokens-1m, 2 keys, fail closed); store memory"
    )
    assert (
        "  p/alice: total_tokens-1m 250 used + 0 reserved of 1000, 750 left, whole again in 60s\n"
        in report + "\n"
    )
    # A window nothing is charged to is whole now, not "again in 1s".
    assert (
        f"  p/bob [EXPIRED {format_timestamp(expired_at)}]: total_tokens-1m 0 used + 0 reserved "
        "of 1000, 1000 left, whole\n"
    ) in report + "\n"
    assert ALICE not in report and "b" * 64 not in report


async def test_shared_scope_status_is_one_line_for_the_proxy(live, quotas, caplog):
    _, gate, addons, _ = live
    rewrite(
        quotas,
        quotas.read_text().replace("    token_limits:", "    scope: proxy\n    token_limits:"),
    )
    await settings_of(addons).reload("test")
    report = await status_report(gate)
    assert "  p (shared by all keys): total_tokens-1m 0 used + 0 reserved of 1000" in report
    assert "  p/alice\n" in report + "\n"


async def test_expired_key_gets_401_saying_so_and_a_later_expiry_admits(live, quotas):
    _, _, addons, clock = live
    expires = format_timestamp(NOW + 30)
    keys = key_entries(alice=ALICE).replace("}\n", f', expires: "{expires}"}}\n')
    rewrite(quotas, quotas.read_text().replace(key_entries(alice=ALICE), keys))
    await settings_of(addons).reload("test")
    before = reverse_flow()
    await through(addons, REQUEST_HOOKS, before)
    assert not notes.answered_by_gate(before)
    clock[0] = NOW + 30  # the gate's clock decides, not the wall clock
    after = reverse_flow()
    await through(addons, REQUEST_HOOKS, after)
    assert after.response.status_code == 401
    error = json.loads(after.response.content)["error"]
    assert error["code"] == "invalid_api_key"
    assert error["message"].startswith(f"This API key ('alice') expired at {expires}.")
    other = reverse_flow(key=BOB)  # an unknown key still gets the plain answer
    await through(addons, REQUEST_HOOKS, other)
    assert "expired" not in json.loads(other.response.content)["error"]["message"]
