"""What the benchmarks share: launching the mock and mitmdump, time budgets, figures, output.

`bench.py` and `bench_burst.py` ask different questions of the same processes; this keeps one
copy of how those are started and stopped, how a percentile is taken and how a report is
printed (a Markdown table to paste into the README, or JSON with `--json`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib.metadata import version
from pathlib import Path

from tokengate_core.tools.children import ADDON, MOCK, Child

MITMDUMP = str(Path(sys.executable).with_name("mitmdump"))
PROVIDER_ENV = "TOKENGATE_BENCH_PROVIDER_KEY"
STARTUP_TIMEOUT = 30.0


class OutOfTime(Exception):
    """A time budget ran out: stop measuring and report what was collected."""


class Budget:
    """Seconds a phase may spend, counted only while it runs (phases may take turns)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.spent = 0.0
        self.exhausted = False  # set when a run was cut or skipped for lack of time

    def left(self) -> float:
        return self.seconds - self.spent

    def deadline(self) -> float:
        """The monotonic time at which this budget ends, if it is spent from now on."""
        return time.monotonic() + max(0.0, self.left())

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        began = time.monotonic()
        try:
            yield
        finally:
            self.spent += time.monotonic() - began


def url_of(child: Child, deadline: float) -> str:
    """The child's base URL once it listens; OutOfTime if the deadline comes first."""
    match = child.wait_ready(max(0.0, min(STARTUP_TIMEOUT, deadline - time.monotonic())))
    if match is not None:
        return f"http://127.0.0.1:{match.group(1)}"
    if time.monotonic() >= deadline:
        raise OutOfTime
    raise RuntimeError(f"{child.popen.args[0]} did not start:\n{''.join(child.lines[-40:])}")


def mock(provider_key: str, *args: str) -> Child:
    """The bundled mock provider, requiring `provider_key`, on a free loopback port."""
    return Child([*MOCK, "--expect-key", provider_key, *args])


def mitmdump(mock_url: str, *args: str, env: dict[str, str] | None = None) -> Child:
    """A reverse-mode mitmdump in front of the mock, on a free loopback port."""
    argv = [MITMDUMP, "--listen-host", "127.0.0.1", "-p", "0", "--mode", f"reverse:{mock_url}"]
    return Child([*argv, "--set", "flow_detail=0", *args], env)


def gateway(mock_url: str, config: Path, provider_key: str, *args: str) -> Child:
    """mitmdump with TokenGate on `config`, whose provider key comes from PROVIDER_ENV; `args`
    are more mitmdump arguments."""
    return mitmdump(
        mock_url,
        "-s", str(ADDON),
        "--set", f"tokengate_config={config}",
        *args,
        env={**os.environ, PROVIDER_ENV: provider_key},
    )  # fmt: skip


def started(stack: contextlib.ExitStack, child: Child) -> Child:
    """`child`, stopped when `stack` closes (also on errors and Ctrl-C)."""
    stack.callback(child.stop)
    return child


def stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so the `finally` blocks stop every child."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: with few samples it stays a measured value rather than an interpolation."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def median(values: Sequence[float | None], digits: int = 3) -> float | None:
    """The median of the values that were measured, rounded; None when there are none."""
    known = [value for value in values if value is not None]
    return round(statistics.median(known), digits) if known else None


def cell(value: float | int | None, template: str = "{:.0f}") -> str:
    """A figure as text (`template` as for str.format, e.g. "{:.2f}x"); "-" where unmeasured."""
    return "-" if value is None else template.format(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    """A Markdown table: the first `text_columns` left-aligned, the figures right-aligned."""
    rule = ["---"] * text_columns + ["--:"] * (len(headers) - text_columns)
    lines = [headers, rule, *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


Column = tuple[str, str, str]  # header, field of the figures, template for `cell`


def figures_table(
    labels: Sequence[str], rows: Iterable[tuple[Sequence[str], dict]], columns: Sequence[Column]
) -> str:
    """A table of (labels, figures) rows: the labels as given, then one cell per column."""
    return table(
        [*labels, *(header for header, *_ in columns)],
        [
            [*texts, *(cell(figures.get(key), template) for _, key, template in columns)]
            for texts, figures in rows
        ],
        text_columns=len(labels),
    )


def environment() -> dict[str, object]:
    """What a reader needs to compare two runs: versions, CPUs, when."""
    return {
        "mitmproxy": version("mitmproxy"),
        "python": ".".join(map(str, sys.version_info[:3])),
        "cpus": os.cpu_count(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark has: `--json`."""
    parser = argparse.ArgumentParser(
        description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object, not Markdown")
    return parser


def emit(report: dict, markdown: Callable[[dict], str], as_json: bool) -> None:
    print(json.dumps(report, indent=2) if as_json else markdown(report))
