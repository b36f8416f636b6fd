"""The ledger, the usage endpoint and flow comments inside mitmproxy's test harness."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from datetime import UTC, datetime

import pytest
from mitmproxy import exceptions
from mitmproxy.test import tflow, tutils
from tokengate_core import notes
from tokengate_core.annotate import annotate
from tokengate_core.audit import LedgerWriter, iso_time, ledger_path
from tokengate_core.keys import format_timestamp, hash_key
from tokengate_core.reporting import Reporting
from tokengate_core.tools.mock import LOREM

from tests.support.harness import nested_in_content, reverse_flow, through
from tests.support.processes import wait_until, write_quotas
from tests.support.quotas import ALICE, PROXIES, key_entries

UPSTREAM = "http://upstream.test:8000"
USAGE = json.dumps({"usage": {"prompt_tokens": 9, "completion_tokens": 11}}).encode()


def lines_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_iso_time_is_utc_with_milliseconds():
    moment = datetime(2026, 11, 29, 14, 3, 7, 123000, tzinfo=UTC)
    assert iso_time(moment.timestamp()) == "2026-11-29T14:03:07.123Z"
    assert iso_time(0) == "1970-01-01T00:00:00.000Z"


def test_ledger_path_default_beside_the_quotas_file_and_off(tmp_path):
    config = str(tmp_path / "q.yaml")
    assert ledger_path("auto", config) == tmp_path / ".state" / "ledger.jsonl"
    assert ledger_path("", config) is None
    assert str(ledger_path("x/l.jsonl", config)) == "x/l.jsonl"


def test_writer_rotates_by_size_and_keeps_what_it_is_told(tmp_path):
    path = tmp_path / "ledger.jsonl"
    for n in range(30):
        writer = LedgerWriter(path, max_size=200, keep=2)  # one batch per writer: rotates often
        writer.write({"n": n, "pad": "x" * 40})
        writer.write({"n": n, "pad": "y" * 40})
        writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ledger.jsonl",
        "ledger.jsonl.1",
        "ledger.jsonl.2",
    ]
    newest, older, oldest = (
        lines_of(tmp_path / name) for name in sorted(p.name for p in tmp_path.iterdir())
    )
    assert all(path.stat().st_size <= 200 for path in tmp_path.iterdir())
    assert [line["n"] for line in oldest + older + newest] == [27, 27, 28, 28, 29, 29]


def test_writer_keep_zero_starts_over(tmp_path):
    path = tmp_path / "ledger.jsonl"
    for n in range(3):
        writer = LedgerWriter(path, max_size=50, keep=0)
        writer.write({"n": n, "pad": "z" * 40})
        writer.close()
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.jsonl"]
    assert lines_of(path) == [{"n": 2, "pad": "z" * 40}]


def test_writer_outlives_a_removed_folder_and_tells_how_many_lines_it_lost(tmp_path, caplog):
    folder = tmp_path / "audit"
    folder.mkdir()
    path = folder / "ledger.jsonl"
    writer = LedgerWriter(path, max_size=1 << 20, keep=1)
    try:
        writer.write({"n": 1})
        assert wait_until(lambda: path.exists() and path.read_text() == '{"n":1}\n')
        shutil.rmtree(folder)
        writer.write({"n": 2})
        writer.write({"n": 3})
        assert wait_until(lambda: writer.dropped == 2)
        folder.mkdir()  # the next batch finds the file again
        writer.write({"n": 4})
    finally:
        writer.close()
    assert lines_of(path) == [{"n": 4}]
    assert caplog.text.count("dropping lines until it can be written again") == 1
    assert caplog.text.count("is written again; 2 line(s) were dropped meanwhile") == 1
    assert writer.dropped == 0


def test_writer_queue_is_bounded_while_the_disk_stalls(tmp_path, caplog):
    path = tmp_path / "ledger.jsonl"
    os.mkfifo(path)  # opening it for writing blocks until a reader comes: a stalled disk
    writer = LedgerWriter(path, max_size=1 << 20, keep=1, max_queued=5)
    for n in range(8):
        writer.write({"n": n})
    dropped, warned = writer.dropped, caplog.text.count("the disk is not keeping up")
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(path.read_bytes()))
    reader.start()  # the disk moves again
    writer.close()
    reader.join(10)
    assert (dropped, warned) == (3, 1)
    assert [json.loads(line)["n"] for line in received[0].splitlines()] == [0, 1, 2, 3, 4]
    assert "is written again; 3 line(s) were dropped meanwhile" in caplog.text


def test_writer_starts_on_a_line_of_its_own_after_a_line_cut_short(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"n":1}\n{"n":')  # a crash, or a full disk, in the middle of a line
    writer = LedgerWriter(path, max_size=1 << 20, keep=1)
    writer.write({"n": 2})
    writer.close()
    assert path.read_text().splitlines() == ['{"n":1}', '{"n":', '{"n":2}']


@pytest.fixture
def ledger(gate_addons, tmp_path):
    tctx, _, addons = gate_addons
    (addon,) = [a for a in addons if isinstance(a, Reporting)]
    path = tmp_path / "audit" / "ledger.jsonl"
    tctx.configure(addon, tokengate_ledger=str(path))
    addon.running()
    return addon, path


def test_bad_ledger_options_at_start_up_are_one_log_line(gate_addons, caplog):
    tctx, _, addons = gate_addons
    (addon,) = [a for a in addons if isinstance(a, Reporting)]
    tctx.configure(addon, tokengate_ledger_max_size="lots")
    assert "tokengate: refusing to start: tokengate_ledger_max_size: 'lots'" in caplog.text


def test_ledger_options_are_validated(gate_addons, ledger):
    tctx, _, _ = gate_addons
    addon, _ = ledger
    with pytest.raises(exceptions.OptionsError, match="not a size"):
        tctx.configure(addon, tokengate_ledger_max_size="lots")
    with pytest.raises(exceptions.OptionsError, match="0 or more"):
        tctx.configure(addon, tokengate_ledger_keep=-1)
    tctx.configure(addon, tokengate_ledger="")
    assert addon.writer is None


async def test_ledger_lines_for_admitted_and_refused_flows(gate_addons, ledger):
    _, _, addons = gate_addons
    addon, path = ledger
    admitted = reverse_flow()
    await through(addons, ("requestheaders", "request"), admitted)
    admitted.response = tutils.tresp(content=USAGE)
    await through(addons, ("responseheaders", "response"), admitted)
    await through(addons, ("error",), admitted)  # a late error must not write a second line
    anonymous = reverse_flow(key=None)
    await through(addons, ("requestheaders", "request", "responseheaders", "response"), anonymous)
    failed = reverse_flow()
    await through(addons, ("requestheaders", "request", "error"), failed)
    addon.done()
    first, second, third = lines_of(path)
    assert first["key"] == "alice" and first["status"] == 200 and first["decision"] == "admitted"
    assert (first["prompt_tokens"], first["completion_tokens"], first["total_tokens"]) == (
        9,
        11,
        20,
    )
    assert first["remaining"] == {"total_tokens-1m": 980}
    assert first["time"] == iso_time(admitted.request.timestamp_start)
    assert (second["status"], second["decision"], second["key"]) == (401, "unauthorized", None)
    assert (third["status"], third["decision"], third["total_tokens"]) == (None, "error", 0)
    assert ALICE not in path.read_text()


async def test_usage_query_is_answered_after_authentication(gate_addons):
    _, _, addons = gate_addons
    spent = reverse_flow()
    await through(addons, ("requestheaders", "request"), spent)
    spent.response = tutils.tresp(content=USAGE)
    await through(addons, ("responseheaders", "response"), spent)
    query = reverse_flow(path="/p/tokengate/usage")
    query.request.method = "GET"
    await through(addons, ("requestheaders", "request"), query)
    assert query.response.status_code == 200
    assert "authorization" not in query.request.headers  # nothing to forward, nothing kept
    body = json.loads(query.response.content)
    [limit] = body["limits"]
    assert (limit["used"], limit["remaining"], limit["limit"]) == (20, 980, 1000)
    anonymous = reverse_flow(path="/p/tokengate/usage", key=None)
    anonymous.request.method = "GET"
    await through(addons, ("requestheaders", "request"), anonymous)
    assert anonymous.response.status_code == 401


async def test_comments_and_markers(gate_addons):
    _, _, addons = gate_addons
    admitted = reverse_flow()
    await through(addons, ("requestheaders", "request"), admitted)
    admitted.response = tutils.tresp(content=USAGE)
    await through(addons, ("responseheaders", "response"), admitted)
    assert admitted.comment == (
        "tokengate: p/alice gpt-4o 20 tokens (reported); left: total_tokens-1m 980"
    )
    assert not admitted.marked
    # Sent: the flow shows the URL it was sent to (as the log does), not one that never existed.
    assert admitted.request.url == "http://upstream.test:8000/v1/chat/completions"
    anonymous = reverse_flow(key=None)
    await through(addons, ("requestheaders", "request", "responseheaders", "response"), anonymous)
    assert anonymous.request.path == "/p/chat/completions"  # never sent: the caller's URL
    assert anonymous.marked == ":lock:" and anonymous.comment.startswith("tokengate 401")
    state = {"proxy": "p", "key": "alice", "answered_by_gate": 429, "refused_by": "t-1m"}
    refused = reverse_flow()
    refused.metadata[notes.META] = {**state, "remaining": {"t-1m": 0}}
    refused.response = tutils.tresp(status_code=429)
    annotate(refused, refused.metadata[notes.META], 429)
    assert refused.marked == ":no_entry:"
    assert refused.comment == "tokengate 429 by t-1m: p/alice; left: t-1m 0"


def captured_flow(saved: dict, *, usage: bytes | None = None, error: str | None = None):
    """A flow as `-nr` reads it: not live, its answer (or error) already there, its notes saved."""
    flow = reverse_flow()
    flow.live = False
    flow.metadata[notes.META] = saved
    if usage is not None:
        flow.response = tutils.tresp(content=usage)
    if error is not None:
        flow.error = tflow.terr(error)
    return flow


async def test_replay_follows_the_live_rules_for_errors(gate_addons, ledger):
    _, _, addons = gate_addons
    addon, path = ledger
    saved = {"proxy": "p", "key": "alice", "endpoint": "chat/completions", "allowed": True}
    flows = [
        captured_flow(saved, usage=USAGE),
        captured_flow(saved, error="Connection refused"),  # provider never answered: free
        captured_flow(saved, error="Client disconnected."),  # after it left: reservation kept
        captured_flow({**saved, "key": "mallory"}, usage=USAGE),  # not in the quotas now
    ]
    for flow in flows:
        hooks = ("requestheaders", "request", "response" if flow.response else "error")
        await through(addons, hooks, flow)
    addon.done()
    ok, unanswered, hung_up, unknown = lines_of(path)
    assert all(line["replay"] for line in (ok, unanswered, hung_up, unknown))
    assert (ok["status"], ok["total_tokens"], ok["remaining"]) == (
        200,
        20,
        {"total_tokens-1m": 980},
    )
    assert (unanswered["status"], unanswered["total_tokens"], unanswered["remaining"]) == (
        None,
        0,
        {"total_tokens-1m": 980},
    )
    assert hung_up["usage_source"] == "estimated" and hung_up["total_tokens"] > 0
    assert hung_up["total_tokens"] == hung_up["reserved"]
    assert (unknown["status"], unknown["decision"]) == (401, "unauthorized")
    assert flows[3].response.status_code == 200  # the captured flow is left as it was


def test_ledger_folder_that_cannot_be_made_is_refused(gate_addons, ledger, tmp_path):
    tctx, _, _ = gate_addons
    addon, _ = ledger
    (tmp_path / "file").write_text("")
    with pytest.raises(exceptions.OptionsError, match="cannot create"):
        tctx.configure(addon, tokengate_ledger=str(tmp_path / "file" / "ledger.jsonl"))


async def test_replay_refuses_a_key_that_had_expired_at_the_flows_own_time(
    gate_addons,
    ledger,
    tmp_path,
):
    tctx, gate, addons = gate_addons
    addon, path = ledger
    expires = 1_800_000_000
    until = format_timestamp(expires)
    expiring = f'      alice: {{sha256: "{hash_key(ALICE)}", expires: "{until}"}}\n'
    proxies = PROXIES.replace(key_entries(alice=ALICE), expiring)
    tctx.configure(
        addons[0],
        tokengate_config=str(write_quotas(tmp_path / "expiring.yaml", UPSTREAM, proxies)),
    )
    assert not next(iter(gate.proxy("p").keys)).expired(gate.clock())  # live: not yet
    saved = {"proxy": "p", "key": "alice", "endpoint": "chat/completions", "allowed": True}
    before, at = captured_flow(saved, usage=USAGE), captured_flow(saved, usage=USAGE)
    before.request.timestamp_start, at.request.timestamp_start = expires - 1, expires
    for flow in (before, at):
        await through(addons, ("requestheaders", "request", "response"), flow)
    addon.done()
    still_valid, expired = lines_of(path)
    assert (still_valid["status"], still_valid["decision"]) == (200, "admitted")
    assert (expired["status"], expired["decision"]) == (401, "unauthorized")
    assert expired["total_tokens"] == 0


@pytest.mark.parametrize(
    ("endpoint", "field"),
    [
        ("chat/completions", "max_tokens"),
        ("chat/completions", "max_completion_tokens"),
        ("responses", "max_output_tokens"),
    ],
)
async def test_replay_reserves_the_max_tokens_the_caller_asked_for(
    gate_addons,
    ledger,
    endpoint,
    field,
):
    """The capture holds the body the gate sent upstream, with its max tokens lowered to 500."""
    _, _, addons = gate_addons
    addon, path = ledger
    request = {"model": "gpt-4o", field: 500}
    if endpoint == "responses":
        request["input"] = "Hello!"
    else:
        request["messages"] = [{"role": "user", "content": "Hello!"}]
    saved = {"proxy": "p", "key": "alice", "endpoint": endpoint, "allowed": True}
    flow = captured_flow(
        {**saved, "max_tokens_lowered_to": 500, "max_tokens_requested": 5000}, usage=USAGE
    )
    flow.request.path = f"/p/{endpoint}"
    flow.request.content = json.dumps(request).encode()
    await through(addons, ("requestheaders", "request", "response"), flow)
    addon.done()
    (line,) = lines_of(path)
    # 5000 asked for, more than the whole limit: held as the whole limit (500 would hold less).
    assert line["reserved"] == 1000
    assert json.loads(flow.request.content)[field] == 500  # the captured flow is left as it was


async def test_replay_without_the_callers_value_reserves_what_was_sent(
    gate_addons,
    ledger,
):
    _, _, addons = gate_addons
    addon, path = ledger
    saved = {"proxy": "p", "key": "alice", "endpoint": "chat/completions", "allowed": True}
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello!"}]}
    flow = captured_flow(saved, usage=USAGE)
    flow.request.content = json.dumps({**body, "max_tokens": 500}).encode()
    await through(addons, ("requestheaders", "request", "response"), flow)
    addon.done()
    (line,) = lines_of(path)
    assert 500 < line["reserved"] < 1000  # the prompt estimate plus the 500 sent


async def test_replay_of_a_body_too_deep_to_count_is_invalid_as_live(
    gate_addons,
    ledger,
):
    _, _, addons = gate_addons
    addon, path = ledger
    saved = {"proxy": "p", "key": "alice", "endpoint": "chat/completions", "allowed": True}
    flow = captured_flow(saved, usage=USAGE)
    flow.request.content = nested_in_content(sys.getrecursionlimit() + 100).encode()
    await through(addons, ("requestheaders", "request", "response"), flow)
    addon.done()
    (line,) = lines_of(path)
    assert (line["status"], line["decision"], line["reserved"]) == (400, "invalid", 0)


async def test_replay_charges_what_the_replayed_quotas_would_have_allowed(
    gate_addons,
    ledger,
):
    """Captured under roomier quotas, the second call's answer ran to 900 tokens; under these
    (1000 a minute) live would have lowered its max tokens to what was left, so replay charges
    that and says so, rather than a key at twice its limit."""
    _, _, addons = gate_addons
    addon, path = ledger
    saved = {"proxy": "p", "key": "alice", "endpoint": "chat/completions", "allowed": True}
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 900,
    }
    long_answer = json.dumps({"usage": {"prompt_tokens": 9, "completion_tokens": 900}}).encode()
    flows = [captured_flow(saved, usage=long_answer) for _ in range(2)]
    for flow in flows:
        flow.request.content = json.dumps(body).encode()
        await through(addons, ("requestheaders", "request", "response"), flow)
    addon.done()
    first, second = lines_of(path)
    assert first["total_tokens"] == 909 and "max_tokens_lowered_to" not in first
    left = 1000 - 909
    assert second["completion_tokens"] == second["max_tokens_lowered_to"] == left - 9
    assert first["total_tokens"] + second["total_tokens"] <= 1000


async def test_replay_of_a_stream_the_gate_asked_usage_of_agrees_with_live(
    gate_addons,
    ledger,
):
    """Live, the gate asked the stream for usage and dropped that chunk from what the caller
    (and so the capture) got: replay takes the provider's figures noted live."""
    _, _, addons = gate_addons
    addon, path = ledger
    live_usage = {"prompt_tokens": 9, "completion_tokens": 11, "total_tokens": 20}
    saved = {
        "proxy": "p",
        "key": "alice",
        "endpoint": "chat/completions",
        "allowed": True,
        "usage_injected": True,
        "usage": {**live_usage, "source": "reported"},
    }
    stream = b'data: {"choices": [{"delta": {"content": "Hi there"}}]}\n\ndata: [DONE]\n\n'
    flow = captured_flow(saved, usage=stream)
    flow.response.headers["content-type"] = "text/event-stream"
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello!"}], "stream": True}
    flow.request.content = json.dumps(body).encode()
    await through(addons, ("requestheaders", "request", "response"), flow)
    addon.done()
    (line,) = lines_of(path)
    assert line["usage_source"] == "reported"
    assert (line["prompt_tokens"], line["completion_tokens"]) == (9, 11)


async def test_replay_corrects_prompt_estimates_with_what_it_learns_from_the_capture(
    gate_addons, ledger
):
    """A provider that billed 10 % more than the estimate: replay reserves the cold margin at
    first, then, once warm, what the capture's answers taught it, as live would."""
    _, _, addons = gate_addons
    addon, path = ledger
    body = {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": LOREM[:400]}]}
    body["max_tokens"] = 6  # the estimate is 85 prompt tokens; the provider billed 94
    saved = {"proxy": "p", "key": "alice", "endpoint": "chat/completions", "allowed": True}
    usage = json.dumps({"usage": {"prompt_tokens": 94, "completion_tokens": 6}}).encode()
    for _ in range(9):
        flow = captured_flow(saved, usage=usage)
        flow.request.content = json.dumps(body).encode()
        await through(addons, ("requestheaders", "request", "response"), flow)
    addon.done()
    reserved = [line["reserved"] for line in lines_of(path)]
    assert reserved == [107 + 6] * 8 + [94 + 6]  # 85 x 1.25, then 85 x 94/85
