"""What went through the gate, from its audit ledger: per proxy, key and model.

    tokengate-report .state/ledger.jsonl [more ledgers…] [--since 1h|2026-11-29T14:00Z]
        [--replay] [--json] [--png tokens.png]

The table (default) or JSON (`--json`) gives requests, status counts, tokens and the 429s with
the limit that caused them. `--png` also draws, per proxy and limit, the tokens each key had in
that limit's rolling window over time, the limit as a horizontal line and 429s as crosses.
Rotated ledgers (`ledger.jsonl.1`, …) are read when named too. Lines of a QA replay
(`"replay": true`) are what the quotas would have done, not traffic: they are left out, and
`--replay` reports them alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tokengate_core.config import parse_duration
from tokengate_core.yamlsource import ConfigError

TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")
REQUESTS = "requests"
MAX_CHARTS = 12  # proxy/limit panels in one PNG; more would be unreadable


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


@dataclass
class Row:
    proxy: str | None
    key: str | None
    model: str | None
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)
    refused_by: Counter = field(default_factory=Counter)  # limit name -> 429s

    def add(self, line: dict[str, Any]) -> None:
        self.requests += 1
        self.statuses[str(line.get("status"))] += 1
        for name in TOKEN_FIELDS:
            self.tokens[name] += int(line.get(name) or 0)
        if line.get("decision") == "refused":
            self.refused_by[line.get("limit") or "?"] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "proxy": self.proxy,
            "key": self.key,
            "model": self.model,
            "requests": self.requests,
            "statuses": dict(sorted(self.statuses.items())),
            **{name: self.tokens[name] for name in TOKEN_FIELDS},
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


def table(rows: list[Row]) -> str:
    header = ("proxy", "key", "model", "requests", "statuses", *TOKEN_FIELDS, "429s", "429 by")
    body = [
        (
            row.proxy or "-",
            row.key or "-",
            row.model or "-",
            str(row.requests),
            _counts(row.statuses),
            *(str(row.tokens[name]) for name in TOKEN_FIELDS),
            str(sum(row.refused_by.values())),
            _counts(row.refused_by),
        )
        for row in rows
    ]
    totals = summarize_totals(rows)
    tokens = (str(totals[name]) for name in TOKEN_FIELDS)
    body.append(("all", "", "", str(totals["requests"]), "", *tokens, str(totals["refused"]), ""))
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]
    numeric = {3, 5, 6, 7, 8}
    out = []
    for cells in [header, *body]:
        out.append(
            "  ".join(
                cell.rjust(width) if i in numeric else cell.ljust(width)
                for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )
    return "\n".join(out)


def summarize_totals(rows: list[Row]) -> dict[str, int]:
    totals = {"requests": sum(row.requests for row in rows)}
    for name in TOKEN_FIELDS:
        totals[name] = sum(row.tokens[name] for row in rows)
    totals["refused"] = sum(sum(row.refused_by.values()) for row in rows)
    return totals


def charge(line: dict[str, Any], dimension: str) -> int:
    """What an admitted request put into a window of `dimension` (refusals put nothing)."""
    if line.get("decision") != "admitted":
        return 0
    return 1 if dimension == REQUESTS else int(line.get(dimension) or 0)


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
        {(line.get("proxy"), name) for line in lines for name in line.get("limits") or {}},
        key=lambda pair: (str(pair[0]), pair[1]),
    )[:MAX_CHARTS]
    drawn, axes = pyplot.subplots(
        max(1, len(panels)), 1, figsize=(12, 3.2 * max(1, len(panels))), squeeze=False
    )
    start = lines[0]["_epoch"]
    for axis, (proxy, name) in zip(axes[:, 0], panels, strict=False):
        dimension, _, label = name.rpartition("-")
        seconds = parse_duration(label)
        by_key: dict[str, list[dict]] = defaultdict(list)
        for line in lines:
            if line.get("proxy") == proxy and name in (line.get("limits") or {}):
                by_key[line.get("key") or "-"].append(line)
        for key, own in sorted(by_key.items()):
            events = [(ln["_epoch"] - start, charge(ln, dimension)) for ln in own]
            points = rolling([e for e in events if e[1]], seconds)
            if points:
                axis.step(*zip(*points, strict=True), where="post", label=key)
            refused = [ln for ln in own if ln.get("limit") == name]
            if refused:
                at = [ln["_epoch"] - start for ln in refused]
                axis.plot(at, [ln["limits"][name] for ln in refused], "x", color="red")
        steps = limit_steps(lines, proxy, name)
        end = lines[-1]["_epoch"] - start + seconds  # as far as the last window reaches
        xs = [at - start for at, _ in steps] + [end]
        counts = [count for _, count in steps]
        style = {"where": "post", "color": "black", "linestyle": "--", "label": f"limit {name}"}
        axis.step(xs, [*counts, counts[-1]], **style)
        if max(counts) > 10 * max(1, min(counts)):  # a raised limit would flatten the usage
            axis.set_yscale("symlog", linthresh=max(1, min(counts)))
        axis.set_title(f"{proxy}: {name} (rolling {label}); x = 429")
        axis.set_xlabel(f"seconds since {lines[0]['time']}")
        axis.set_ylabel(dimension)
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
    parser.add_argument("--png", type=Path, help="also draw tokens over time per key to FILE")
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
        print(json.dumps(summary, indent=2))
    else:
        print(table(rows))
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
