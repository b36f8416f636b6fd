"""What went through the gate, from its audit ledger: per proxy, key and model.

    tokengate-report .state/ledger.jsonl [more ledgers…] [--since 1h|2026-11-29T14:00Z]
        [--replay] [--json] [--png tokens.png]

The table (default) or JSON (`--json`) gives requests, status counts, tokens (cached prompt and
reasoning tokens too), what was spent in USD, and the 429s with the limit that caused them; the
spend is also summed per proxy, per key and per model. `--png` also draws, per proxy and limit,
what each key had in that limit's rolling window over time (tokens, requests or USD), the limit
as it stood at each moment and 429s as crosses.
Rotated ledgers (`ledger.jsonl.1`, …) are read when named too. Lines of a QA replay
(`"replay": true`) are what the quotas would have done, not traffic: they are left out, and
`--replay` reports them alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tokengate_core.config import parse_duration
from tokengate_core.prices import MICRO, usd
from tokengate_core.yamlsource import ConfigError

TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")
PART_FIELDS = ("cached_prompt_tokens", "cache_write_tokens", "reasoning_tokens")
REQUESTS = "requests"
MONEY = "usd"  # budgets: their limits count micro-dollars
MAX_CHARTS = 12  # proxy/limit panels in one PNG; more would be unreadable
_LIMIT_NAME = re.compile(r"^([a-z_]+)-([1-9][0-9]*[smhd])")  # dimension-duration, then anything


def parse_time(text: str) -> float:
    """Epoch seconds from the ledger's ISO 8601 (`…Z`) or any ISO 8601 with an offset."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone (add Z for UTC)")
    return moment.timestamp()


def since_epoch(text: str, now: float) -> float:
    """`--since`: a duration back from now (30m, 2h, 1d) or an ISO 8601 time."""
    try:
        return now - parse_duration(text)
    except (ConfigError, ValueError):
        return parse_time(text)


def read_ledgers(paths: Iterable[Path], since: float | None) -> Iterator[dict[str, Any]]:
    """The ledger lines from `since` on, live traffic and QA replay alike."""
    for path in paths:
        with path.open(encoding="utf-8") as handle:
            for number, text in enumerate(handle, 1):
                if not text.strip():
                    continue
                try:
                    line = json.loads(text)
                    line["_epoch"] = parse_time(line["time"])
                except (ValueError, KeyError, TypeError) as e:
                    warning = f"report: {path}:{number}: skipped, not a ledger line ({e})"
                    print(warning, file=sys.stderr)
                    continue
                if since is None or line["_epoch"] >= since:
                    yield line


def cost_micro(line: dict[str, Any]) -> int | None:
    """A line's cost in micro-dollars (exact: `cost_usd` is written from them); None where the
    gate did not price the call."""
    value = line.get("cost_usd")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return round(value * MICRO)


@dataclass
class Row:
    proxy: str | None
    key: str | None
    model: str | None
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)
    refused_by: Counter = field(default_factory=Counter)  # limit name -> 429s
    spent: int = 0  # micro-dollars, summed over the lines that carry a cost
    priced: int = 0  # lines that carry a cost

    def add(self, line: dict[str, Any]) -> None:
        self.requests += 1
        self.statuses[str(line.get("status"))] += 1
        for name in (*TOKEN_FIELDS, *PART_FIELDS):
            self.tokens[name] += int(line.get(name) or 0)
        if line.get("decision") == "refused":
            self.refused_by[line.get("limit") or "?"] += 1
        micro = cost_micro(line)
        if micro is not None:
            self.spent += micro
            self.priced += 1

    @property
    def cost_usd(self) -> float | None:
        return usd(self.spent) if self.priced else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "proxy": self.proxy,
            "key": self.key,
            "model": self.model,
            "requests": self.requests,
            "statuses": dict(sorted(self.statuses.items())),
            **{name: self.tokens[name] for name in (*TOKEN_FIELDS, *PART_FIELDS)},
            "cost_usd": self.cost_usd,
            "refused": sum(self.refused_by.values()),
            "refused_by": dict(sorted(self.refused_by.items())),
        }


def summarize(lines: Iterable[dict[str, Any]]) -> list[Row]:
    rows: dict[tuple, Row] = {}
    for line in lines:
        group = (line.get("proxy"), line.get("key"), line.get("model"))
        rows.setdefault(group, Row(*group)).add(line)
    return sorted(rows.values(), key=lambda row: tuple(str(part or "") for part in _group(row)))


def _group(row: Row) -> tuple:
    return row.proxy, row.key, row.model


def _counts(counter: Counter) -> str:
    return " ".join(f"{name}:{n}" for name, n in sorted(counter.items())) or "-"


def _dollars(micro: int | None) -> str:
    """Micro-dollars as exact dollars with 6 decimals; `-` for no priced line."""
    return "-" if micro is None else f"{micro // MICRO}.{micro % MICRO:06d}"


TABLE_TOKENS = (*TOKEN_FIELDS, "cached_prompt_tokens", "reasoning_tokens")
TABLE_HEADER = (*TOKEN_FIELDS, "cached", "reasoning", "cost_usd", "429s", "429 by")


def table(rows: list[Row]) -> str:
    header = ("proxy", "key", "model", "requests", "statuses", *TABLE_HEADER)
    body = [
        (
            row.proxy or "-",
            row.key or "-",
            row.model or "-",
            str(row.requests),
            _counts(row.statuses),
            *(str(row.tokens[name]) for name in TABLE_TOKENS),
            _dollars(row.spent if row.priced else None),
            str(sum(row.refused_by.values())),
            _counts(row.refused_by),
        )
        for row in rows
    ]
    totals = summarize_totals(rows)
    tokens = (str(totals[name]) for name in TABLE_TOKENS)
    spent = _dollars(_spent(rows))
    body.append(
        ("all", "", "", str(totals["requests"]), "", *tokens, spent, str(totals["refused"]), "")
    )
    return _aligned([header, *body], numeric=set(range(5, 5 + len(TABLE_TOKENS) + 2)) | {3})


def _aligned(lines: list[tuple[str, ...]], numeric: set[int]) -> str:
    widths = [max(len(cells[i]) for cells in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()
        for cells in lines
    )


def _spent(rows: Iterable[Row]) -> int | None:
    """Micro-dollars spent by `rows`; None when none of their lines was priced."""
    rows = [row for row in rows if row.priced]
    return sum(row.spent for row in rows) if rows else None


def summarize_totals(rows: list[Row]) -> dict[str, Any]:
    totals: dict[str, Any] = {"requests": sum(row.requests for row in rows)}
    for name in (*TOKEN_FIELDS, *PART_FIELDS):
        totals[name] = sum(row.tokens[name] for row in rows)
    spent = _spent(rows)
    totals["cost_usd"] = None if spent is None else usd(spent)
    totals["refused"] = sum(sum(row.refused_by.values()) for row in rows)
    return totals


SPEND_BY = {
    "proxy": lambda row: row.proxy or "-",
    "key": lambda row: f"{row.proxy or '-'}/{row.key or '-'}",
    "model": lambda row: row.model or "-",
}


def spend(rows: list[Row]) -> dict[str, dict[str, int]]:
    """Micro-dollars spent per proxy, per key (`proxy/key`) and per model, over the rows with
    a priced line, the largest first."""
    found: dict[str, dict[str, int]] = {}
    for by, name_of in SPEND_BY.items():
        sums: Counter = Counter()
        for row in rows:
            if row.priced:
                sums[name_of(row)] += row.spent
        found[by] = dict(sorted(sums.items(), key=lambda item: (-item[1], item[0])))
    return found


def spend_table(rows: list[Row]) -> str | None:
    """The spend per proxy, key and model as a table; None when no line was priced."""
    found = spend(rows)
    if not found["proxy"]:
        return None
    lines = [("spend by", "name", "cost_usd")]
    for by, sums in found.items():
        lines += [(by, name, _dollars(micro)) for name, micro in sums.items()]
    return _aligned(lines, numeric={2})


def charge(line: dict[str, Any], dimension: str) -> int:
    """What an admitted request put into a window of `dimension` (refusals put nothing): its
    tokens, 1 request, or its cost in micro-dollars."""
    if line.get("decision") != "admitted":
        return 0
    if dimension == REQUESTS:
        return 1
    if dimension == MONEY:
        return cost_micro(line) or 0
    return int(line.get(dimension) or 0)


def limit_parts(name: str) -> tuple[str, str] | None:
    """A limit's dimension and duration from its name (`total_tokens-1m`, `usd-30d...`); None
    for a name the chart cannot read."""
    match = _LIMIT_NAME.match(name)
    return (match.group(1), match.group(2)) if match else None


def rolling(events: list[tuple[float, int]], seconds: int) -> list[tuple[float, int]]:
    """Usage in (t - seconds, t] at each charge and at each charge's expiry, in time order."""
    times = sorted({t for t, _ in events} | {t + seconds for t, _ in events})
    points, total, start, end = [], 0, 0, 0
    for now in times:
        while end < len(events) and events[end][0] <= now:
            total += events[end][1]
            end += 1
        while start < end and events[start][0] + seconds <= now:
            total -= events[start][1]
            start += 1
        points.append((now, total))
    return points


def limit_steps(lines: list[dict[str, Any]], proxy: str, name: str) -> list[tuple[float, int]]:
    """The count of limit `name` of `proxy` as it stood over time: (epoch, count) from the first
    line that carried it and wherever it changed (a reload); `lines` in time order."""
    steps: list[tuple[float, int]] = []
    for line in lines:
        count = (line.get("limits") or {}).get(name)
        if (
            line.get("proxy") == proxy
            and count is not None
            and (not steps or steps[-1][1] != count)
        ):
            steps.append((line["_epoch"], count))
    return steps


def figure(lines: list[dict[str, Any]]) -> tuple[Any, int]:
    """A matplotlib figure with one panel per proxy and limit (each key's usage in the limit's
    rolling window, the limit as it stood at each moment, 429s as crosses on it), and the number
    of panels; `lines` in time order."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    panels = sorted(
        {
            (line.get("proxy"), name)
            for line in lines
            for name in line.get("limits") or {}
            if limit_parts(name)
        },
        key=lambda pair: (str(pair[0]), pair[1]),
    )[:MAX_CHARTS]
    drawn, axes = pyplot.subplots(
        max(1, len(panels)), 1, figsize=(12, 3.2 * max(1, len(panels))), squeeze=False
    )
    start = lines[0]["_epoch"]
    for axis, (proxy, name) in zip(axes[:, 0], panels, strict=False):
        dimension, label = limit_parts(name)
        seconds = parse_duration(label)
        unit = 1 / MICRO if dimension == MONEY else 1  # budgets are drawn in USD
        by_key: dict[str, list[dict]] = defaultdict(list)
        for line in lines:
            if line.get("proxy") == proxy and name in (line.get("limits") or {}):
                by_key[line.get("key") or "-"].append(line)
        for key, own in sorted(by_key.items()):
            events = [(ln["_epoch"] - start, charge(ln, dimension)) for ln in own]
            points = rolling([e for e in events if e[1]], seconds)
            if points:
                xs, ys = zip(*points, strict=True)
                axis.step(xs, [y * unit for y in ys], where="post", label=key)
            refused = [ln for ln in own if ln.get("limit") == name]
            if refused:
                at = [ln["_epoch"] - start for ln in refused]
                axis.plot(at, [ln["limits"][name] * unit for ln in refused], "x", color="red")
        steps = limit_steps(lines, proxy, name)
        end = lines[-1]["_epoch"] - start + seconds  # as far as the last window reaches
        xs = [at - start for at, _ in steps] + [end]
        counts = [count * unit for _, count in steps]
        style = {"where": "post", "color": "black", "linestyle": "--", "label": f"limit {name}"}
        axis.step(xs, [*counts, counts[-1]], **style)
        if max(counts) > 10 * max(unit, min(counts)):  # a raised limit would flatten the usage
            axis.set_yscale("symlog", linthresh=max(unit, min(counts)))
        axis.set_title(f"{proxy}: {name} (rolling {label}); x = 429")
        axis.set_xlabel(f"seconds since {lines[0]['time']}")
        axis.set_ylabel("USD" if dimension == MONEY else dimension)
        # Beside the panel, never over the data.
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, fontsize="small")
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no limited requests in this ledger", ha="center")
    drawn.tight_layout()
    return drawn, len(panels)


def chart(lines: list[dict[str, Any]], path: Path) -> int:
    """Draw `figure(lines)` to a PNG; returns the number of panels."""
    from matplotlib import pyplot

    drawn, panels = figure(lines)
    drawn.savefig(path, format="png", dpi=80, bbox_inches="tight")
    pyplot.close(drawn)
    return panels


def main(argv: list[str] | None = None) -> int:
    try:
        status = report(argv)
        sys.stdout.flush()  # here, where a reader gone is caught, rather than at exit
        return status
    except BrokenPipeError:  # `--json | head`: the reader has what it wanted
        # Point stdout at /dev/null, so flushing it at exit does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def report(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="tokengate-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("ledgers", nargs="+", type=Path, help="ledger files (JSON Lines)")
    parser.add_argument("--since", help="only lines from this time: 30m, 2h, 1d or ISO 8601")
    parser.add_argument(
        "--replay", action="store_true", help="only the lines of a QA replay (left out otherwise)"
    )
    parser.add_argument("--json", action="store_true", help="JSON instead of a table")
    parser.add_argument(
        "--png", type=Path, help="also draw each limit and its use per key over time to FILE"
    )
    args = parser.parse_args(argv)
    try:
        since = since_epoch(args.since, time.time()) if args.since else None
    except ValueError as e:
        parser.error(f"--since: {e}")
    missing = [str(path) for path in args.ledgers if not path.is_file()]
    if missing:
        parser.error(f"no such ledger: {', '.join(missing)}")
    lines, others = [], 0
    for line in read_ledgers(args.ledgers, since):
        if bool(line.get("replay")) == args.replay:
            lines.append(line)
        else:
            others += 1
    lines.sort(key=lambda line: line["_epoch"])
    if not lines and others:
        print(other_kind(args.replay, others), file=sys.stderr)
    rows = summarize(lines)
    if args.json:
        summary = {"lines": len(lines), "totals": summarize_totals(rows)}
        summary["rows"] = [row.as_dict() for row in rows]
        summary["spend"] = {
            by: {name: usd(micro) for name, micro in sums.items()}
            for by, sums in spend(rows).items()
        }
        print(json.dumps(summary, indent=2))
    else:
        print(table(rows))
        spent = spend_table(rows)
        if spent:
            print()
            print(spent)
    if args.png:
        if lines:
            panels = chart(lines, args.png)
            print(f"report: {args.png}: {panels} chart(s)", file=sys.stderr)
        else:
            print("report: no ledger lines in range; no chart drawn", file=sys.stderr)
    return 0


def other_kind(replay: bool, count: int) -> str:
    """Why the report is empty when the ledger holds only the other kind of line."""
    if replay:
        return f"report: no QA replay lines in range, only {count} of live traffic (drop --replay)"
    return (
        f"report: no live traffic in range, only {count} lines of a QA replay "
        "(add --replay to report them)"
    )


if __name__ == "__main__":
    sys.exit(main())
