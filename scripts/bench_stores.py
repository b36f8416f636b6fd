"""What a store costs per request: one reserve plus one settle, for memory, SQLite and Redis.

Each round opens a fresh store of every kind (SQLite in a temporary folder, Redis on a
redis-server this script starts on a free loopback port) and runs the same requests against
each: first one at a time, then in batches of `--concurrency` gathered together (how flows
arrive on mitmproxy's event loop). Every request holds a caller's two limits, as a typical
proxy does (tokens per minute, requests per minute), with counts that never refuse, so the
window fills up as it would under load. Figures are the median over rounds; ratios are against
the memory store of the same round. The stores run on the real clock (Redis on its own).

    .venv/bin/python -m scripts.bench_stores [--requests 2000] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from tokengate_core.config import REQUESTS, Limit
from tokengate_core.limiter import Bucket, Demand, Usage
from tokengate_core.stores import Store
from tokengate_core.stores.memory import MemoryStore
from tokengate_core.stores.redis import RedisStore
from tokengate_core.stores.sqlite import SqliteStore

from tests.redis_server import RedisServer

KINDS = ("memory", "sqlite", "redis")
MODES = ("sequential", "concurrent")
BUCKETS = (
    Bucket("bench:caller:total_tokens-1m", Limit("total_tokens", 10**12, 60, "1m")),
    Bucket("bench:caller:requests-1m", Limit(REQUESTS, 10**12, 60, "1m")),
)
DEMAND = Demand(20, 100)
USAGE = Usage(20, 42)
RUNS = itertools.count()  # request ids stay unique across runs on one store


class OutOfTime(Exception):
    """The overall budget ran out: report what was measured."""


async def one_request(store: Store, request_id: str) -> None:
    _, reservation = await store.reserve(request_id, BUCKETS, DEMAND)
    if reservation is None:
        raise RuntimeError("the benchmark's limits refused a request")
    await store.settle(reservation, USAGE)


async def measure(store: Store, requests: int, batch: int, deadline: float) -> float:
    """Seconds per request for `requests` requests, `batch` at a time."""
    run = next(RUNS)
    began = time.perf_counter()
    for start in range(0, requests, batch):
        if time.monotonic() > deadline:
            raise OutOfTime
        size = min(batch, requests - start)
        await asyncio.gather(*(one_request(store, f"{run}-{start + i}") for i in range(size)))
    return (time.perf_counter() - began) / requests


def open_store(kind: str, folder: Path, redis_url: str, round_: int) -> Store:
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return SqliteStore(folder / f"round-{round_}.sqlite")
    return RedisStore(redis_url, prefix=f"bench-{round_}")


async def run_round(
    folder: Path, redis_url: str, round_: int, args: argparse.Namespace, deadline: float
) -> dict[str, dict[str, float]]:
    """µs per request by mode and kind, for one round."""
    figures: dict[str, dict[str, float]] = {mode: {} for mode in MODES}
    for kind in KINDS:
        store = open_store(kind, folder, redis_url, round_)
        try:
            await measure(store, min(50, args.requests), 1, deadline)  # warm-up: connect, schema
            for mode, batch in zip(MODES, (1, args.concurrency), strict=True):
                seconds = await measure(store, args.requests, batch, deadline)
                figures[mode][kind] = seconds * 1e6
        finally:
            await store.close()
    return figures


def summarize(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict]]:
    """Median µs per request and median ratio to memory, by mode and kind."""
    summary: dict[str, dict[str, dict]] = {}
    for mode in MODES:
        summary[mode] = {}
        for kind in KINDS:
            micros = [one[mode][kind] for one in rounds]
            ratios = [one[mode][kind] / one[mode]["memory"] for one in rounds]
            summary[mode][kind] = {
                "us_per_request": round(statistics.median(micros), 1),
                "ratio_to_memory": round(statistics.median(ratios), 2),
            }
    return summary


def markdown(report: dict) -> str:
    lines = [
        f"Medians over {report['rounds']} round(s) of {report['requests']} requests per store "
        f"and mode (reserve + settle on two limits; concurrent: batches of "
        f"{report['concurrency']} gathered); redis-server {report['redis_server']}, redis-py "
        f"{report['redis_py']}, SQLite {report['sqlite']}, {report['cpus']} CPU(s)"
        + (": stopped early by --max-seconds." if report["truncated"] else "."),
        "",
        "| store | sequential µs/req | vs memory | concurrent µs/req | vs memory |",
        "|---|--:|--:|--:|--:|",
    ]
    for kind in KINDS:
        cells = [kind]
        for mode in MODES:
            figures = report["stores"][mode][kind]
            cells += [f"{figures['us_per_request']:.1f}", f"{figures['ratio_to_memory']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per store and mode")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each with fresh stores")
    parser.add_argument("--concurrency", type=int, default=16, help="batch size when gathered")
    parser.add_argument(
        "--max-seconds", type=float, default=120.0, help="overall budget; past it the run stops"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object, not Markdown")
    args = parser.parse_args(argv)
    if min(args.requests, args.rounds, args.concurrency) < 1 or args.max_seconds <= 0:
        parser.error("--requests, --rounds and --concurrency must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.max_seconds
    server = RedisServer().start()
    rounds: list[dict[str, dict[str, float]]] = []
    truncated = False
    try:
        with tempfile.TemporaryDirectory(prefix="bench-stores-") as tmp:
            for round_ in range(args.rounds):
                try:
                    rounds.append(
                        asyncio.run(run_round(Path(tmp), server.url, round_, args, deadline))
                    )
                except OutOfTime:
                    truncated = True
                    break
        redis_server = server.version()
    finally:
        server.stop()
    if not rounds:
        print("bench_stores: out of time before a round finished; raise --max-seconds")
        return 1
    report = {
        "requests": args.requests,
        "rounds": len(rounds),
        "concurrency": args.concurrency,
        "truncated": truncated,
        "redis_server": redis_server,
        "redis_py": version("redis"),
        "sqlite": sqlite3.sqlite_version,
        "cpus": os.cpu_count(),
        "stores": summarize(rounds),
    }
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
