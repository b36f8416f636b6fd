"""The ledger report: grouping, totals, --since, the rolling usage and limits drawn in the chart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokengate_core.audit import LedgerWriter, iso_time
from tokengate_core.tools import report

T0 = 1_800_000_000.0


def line(at: float, key: str, total: int, status: int = 200, **extra) -> dict:
    decision = "refused" if status == 429 else "admitted"
    return {
        "time": iso_time(T0 + at),
        "proxy": "p",
        "key": key,
        "model": "m",
        "status": status,
        "decision": decision,
        "limit": "total_tokens-1m" if status == 429 else None,
        "prompt_tokens": total // 2,
        "completion_tokens": total - total // 2,
        "total_tokens": total,
        "limits": {"total_tokens-1m": 100},
        **extra,
    }


@pytest.fixture
def ledger(tmp_path):
    path = tmp_path / "ledger.jsonl"
    writer = LedgerWriter(path, max_size=1 << 20, keep=1)
    for entry in (
        line(0, "alice", 60),
        line(10, "alice", 50),
        line(20, "alice", 0, status=429),
        line(30, "bob", 7),
        line(90, "alice", 5, model="other"),
        line(40, "carol", 1000, replay=True),  # a QA replay's line: not traffic
    ):
        writer.write(entry)
    writer.close()
    with path.open("a") as handle:
        handle.write("not json\n")
    return path


def test_rolling_usage_counts_what_is_in_the_window():
    events = [(0.0, 60), (10.0, 50), (65.0, 5)]
    assert report.rolling(events, 60) == [
        (0.0, 60), (10.0, 110), (60.0, 50), (65.0, 55), (70.0, 5), (125.0, 0),
    ]  # fmt: skip


def test_since_takes_a_duration_or_a_time():
    assert report.since_epoch("2h", now=T0) == T0 - 7200
    assert report.since_epoch(iso_time(T0), now=0) == T0
    with pytest.raises(ValueError):
        report.since_epoch("yesterday", now=T0)


def test_json_groups_by_proxy_key_and_model(ledger, capsys):
    assert report.main([str(ledger), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lines"] == 5
    assert out["totals"] == {
        "requests": 5, "prompt_tokens": 30 + 25 + 3 + 2, "completion_tokens": 30 + 25 + 4 + 3,
        "total_tokens": 122, "cached_prompt_tokens": 0, "cache_write_tokens": 0,
        "reasoning_tokens": 0, "cost_usd": None, "refused": 1,
    }  # fmt: skip
    alice = out["rows"][0]
    assert (alice["key"], alice["model"], alice["requests"]) == ("alice", "m", 3)
    assert alice["statuses"] == {"200": 2, "429": 1}
    assert alice["refused_by"] == {"total_tokens-1m": 1}
    assert [row["total_tokens"] for row in out["rows"]] == [110, 5, 7]


def test_replay_lines_are_left_out_unless_asked_for_alone(ledger, capsys):
    report.main([str(ledger), "--json"])
    live = json.loads(capsys.readouterr().out)
    assert "carol" not in {row["key"] for row in live["rows"]}
    report.main([str(ledger), "--json", "--replay"])
    replayed = json.loads(capsys.readouterr().out)
    assert replayed["lines"] == 1 and replayed["totals"]["total_tokens"] == 1000
    assert [row["key"] for row in replayed["rows"]] == ["carol"]


def test_since_filters_and_table_shows_totals(ledger, capsys):
    report.main([str(ledger), "--since", iso_time(T0 + 25)])
    text = capsys.readouterr()
    assert "not a ledger line" in text.err
    rows = text.out.splitlines()
    assert rows[0].split()[:4] == ["proxy", "key", "model", "requests"]
    assert [row.split()[1] for row in rows[1:-1]] == ["alice", "bob"]
    assert rows[-1].split() == ["all", "2", "5", "7", "12", "0", "0", "-", "0"]


def test_png_is_drawn(ledger, tmp_path, capsys):
    png = tmp_path / "chart.png"
    report.main([str(ledger), "--png", str(png)])
    assert "1 chart(s)" in capsys.readouterr().err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def lines_of(path) -> list[dict]:
    return sorted(report.read_ledgers([path], None), key=lambda line: line["_epoch"])


def write_ledger(path, entries):
    writer = LedgerWriter(path, max_size=1 << 30, keep=1)
    for entry in entries:
        writer.write(entry)
    writer.close()
    return path


def test_chart_draws_each_limit_as_it_stood_and_keeps_the_legend_off_the_data(tmp_path):
    raised = {"limits": {"total_tokens-1m": 500_000}}
    path = write_ledger(
        tmp_path / "ledger.jsonl",
        [
            line(0, "alice", 60),
            line(10, "alice", 50),
            line(20, "alice", 0, status=429),  # refused while the limit was 100
            line(90, "alice", 5000, **raised),  # the file was edited: 500,000 from here on
            line(100, "alice", 0, status=429, **raised),
        ],
    )
    drawn, panels = report.figure(lines_of(path))
    assert panels == 1
    axis = drawn.axes[0]
    limit = next(ln for ln in axis.get_lines() if ln.get_label() == "limit total_tokens-1m")
    assert list(limit.get_ydata()) == [100, 500_000, 500_000]
    assert list(limit.get_xdata()) == [0, 90, 100 + 60]
    crosses = [ln for ln in axis.get_lines() if ln.get_marker() == "x"]
    assert [list(ln.get_ydata()) for ln in crosses] == [[100, 500_000]]
    assert axis.get_yscale() == "symlog"  # 100 and 500,000 both readable
    renderer = drawn.canvas.get_renderer()
    legend = axis.get_legend().get_window_extent(renderer)
    assert legend.x0 >= axis.get_window_extent(renderer).x1  # beside the panel, not over it


def test_limit_steps_follow_each_proxy_on_its_own():
    lines = [
        {"_epoch": 1.0, "proxy": "p", "limits": {"a": 10}},
        {"_epoch": 2.0, "proxy": "q", "limits": {"a": 99}},
        {"_epoch": 3.0, "proxy": "p", "limits": {"a": 10}},
        {"_epoch": 4.0, "proxy": "p", "limits": {"a": 20}},
        {"_epoch": 5.0, "proxy": "p"},  # not limited (a 401): says nothing of the limit
    ]
    assert report.limit_steps(lines, "p", "a") == [(1.0, 10), (4.0, 20)]


def test_an_empty_report_says_where_the_other_lines_are(tmp_path, capsys):
    path = write_ledger(tmp_path / "replay.jsonl", [line(0, "carol", 10, replay=True)])
    assert report.main([str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1].split()[:2] == ["all", "0"]
    assert "only 1 lines of a QA replay (add --replay" in captured.err
    live = write_ledger(tmp_path / "live.jsonl", [line(0, "alice", 10)])
    assert report.main([str(live), "--replay", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["lines"] == 0 and "drop --replay" in captured.err


def test_json_into_a_reader_that_stops_early_prints_no_traceback(tmp_path):
    # Far more JSON than a pipe holds, so the report is still writing when the reader goes.
    path = write_ledger(tmp_path / "big.jsonl", [line(i, f"key-{i}", 10) for i in range(3000)])
    shim = Path(__file__).resolve().parents[2] / "scripts" / "report.py"
    process = subprocess.Popen(
        [sys.executable, str(shim), str(path), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout.readline() == b"{\n"  # what `head -1` would take
    process.stdout.close()
    error = process.stderr.read().decode()
    process.wait(timeout=60)
    assert "Traceback" not in error and "BrokenPipe" not in error, error


def priced(at: float, key: str, cost: float | None, model: str = "gpt-4o", **extra) -> dict:
    """A ledger line of a proxy with a budget: its cost in dollars, as the gate writes it."""
    extra.setdefault("limits", {"total_tokens-1m": 100_000, "usd-1d": 1_000_000})
    entry = line(at, key, 100, model=model, **extra)
    entry["proxy"] = "team"
    if cost is not None:
        entry["cost_usd"] = cost
    return entry


def test_spend_per_proxy_key_and_model_is_summed_exactly(tmp_path, capsys):
    path = write_ledger(
        tmp_path / "ledger.jsonl",
        [
            priced(0, "alice", 0.1),
            priced(1, "alice", 0.2),  # 0.1 + 0.2 in floats is 0.30000000000000004
            priced(2, "bob", 0.000001, model="gpt-4o-mini", cached_prompt_tokens=40),
            priced(3, "bob", None, model="gpt-4o-mini", reasoning_tokens=30),  # not priced
            line(4, "carol", 10),  # another proxy, without a budget
        ],
    )
    assert report.main([str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["totals"]["cost_usd"] == 0.300001
    assert (out["totals"]["cached_prompt_tokens"], out["totals"]["reasoning_tokens"]) == (40, 30)
    assert out["spend"] == {
        "proxy": {"team": 0.300001},
        "key": {"team/alice": 0.3, "team/bob": 0.000001},
        "model": {"gpt-4o": 0.3, "gpt-4o-mini": 0.000001},
    }
    rows = {(row["proxy"], row["key"]): row for row in out["rows"]}
    assert rows[("team", "alice")]["cost_usd"] == 0.3
    assert rows[("team", "bob")]["cost_usd"] == 0.000001  # the priced line of the two
    assert rows[("p", "carol")]["cost_usd"] is None
    assert report.main([str(path)]) == 0
    text = capsys.readouterr().out
    table, spent = text.split("\n\n")
    header, *body, total = table.splitlines()
    assert header.split()[-5:] == ["reasoning", "cost_usd", "429s", "429", "by"]
    assert total.split()[-2:] == ["0.300001", "0"]
    assert body[0].split()[:2] == ["p", "carol"] and "-" in body[0].split()
    assert spent.splitlines() == [
        "spend by  name         cost_usd",
        "proxy     team         0.300001",
        "key       team/alice   0.300000",
        "key       team/bob     0.000001",
        "model     gpt-4o       0.300000",
        "model     gpt-4o-mini  0.000001",
    ]


def test_chart_draws_a_budget_in_dollars_as_it_stood(tmp_path):
    raised = {"limits": {"total_tokens-1m": 100_000, "usd-1d": 2_000_000}}
    path = write_ledger(
        tmp_path / "ledger.jsonl",
        [
            priced(0, "alice", 0.6),
            priced(10, "alice", 0.4),
            priced(20, "alice", None, status=429, limit="usd-1d"),
            priced(30, "alice", 0.5, **raised),  # the budget was raised to $2
        ],
    )
    for entry_line in lines_of(path):
        assert "usd-1d" in entry_line["limits"]
    drawn, panels = report.figure(lines_of(path))
    assert panels == 2  # the token limit and the budget
    budget = next(axis for axis in drawn.axes if "usd-1d" in axis.get_title())
    assert budget.get_ylabel() == "USD"
    limit = next(ln for ln in budget.get_lines() if ln.get_label() == "limit usd-1d")
    assert list(limit.get_ydata()) == [1.0, 2.0, 2.0]
    spent = next(ln for ln in budget.get_lines() if ln.get_label() == "alice")
    assert max(spent.get_ydata()) == pytest.approx(1.5)
    crosses = [ln for ln in budget.get_lines() if ln.get_marker() == "x"]
    assert [list(ln.get_ydata()) for ln in crosses] == [[1.0]]


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("total_tokens-1m", ("total_tokens", "1m")),
        ("usd-30d", ("usd", "30d")),
        ("requests-1m[o4-mini]", ("requests", "1m")),
        ("usd-1d-proxy", ("usd", "1d")),
        ("weird", None),
    ],
)
def test_limit_names_are_read_for_their_dimension_and_window(name, parts):
    assert report.limit_parts(name) == parts
