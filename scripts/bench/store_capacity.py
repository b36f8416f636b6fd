"""What a limit check costs on each store, and how many gateways one Redis serves.

One run, in this process, against fresh stores: memory, SQLite (a file in a temporary folder),
Redis (its own `redis-server --save '' --appendonly no` on a free loopback port) and Redis
Cluster (three masters, no replicas, on free loopback ports). Each store takes `--requests`
reserves then settles on the store phase's two limits (`bench.py`), one at a time and then
`--batch` gathered at a time: µs per request in this process. For the two Redis stores the
server's own CPU time (`INFO cpu`, every master of the cluster) over the gathered run gives its
cost per request, and from it the requests per second one Redis core can decide (1 s divided by
that cost) and the gateways it serves at `--rate` requests per second each, kept at most
`--busy` busy. Every run has a time cap (`--seconds`); a run cut short says so.

    .venv/bin/python -m scripts.bench.store_capacity [--requests 2000] [--batch 32]
        [--rate 100] [--busy 0.5] [--seconds 120] [--json]
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import redis
from tokengate_core.stores import Store
from tokengate_core.stores.memory import MemoryStore
from tokengate_core.stores.redis import RedisStore
from tokengate_core.stores.sqlite import SqliteStore

from scripts.bench.bench import STORE_BUCKETS, STORE_MODES, store_calls
from scripts.bench.benchkit import (
    Column,
    OutOfTime,
    emit,
    environment,
    figures_table,
    parser,
)
from scripts.bench.redis_cluster import LocalCluster
from scripts.bench.redis_server import RedisServer

KINDS = ("memory", "sqlite", "redis", "redis-cluster")
MAX_REQUESTS = 100_000
WARM_UP = 50  # requests before measuring: connections opened, scripts loaded


def server_use(ports: list[int]) -> tuple[float, float]:
    """CPU seconds the redis-server processes on `ports` have used (user + system), and the
    seconds of it spent running the scripts (EVALSHA's `usec` in INFO commandstats)."""
    cpu_seconds = script_seconds = 0.0
    for port in ports:
        with redis.Redis(port=port, socket_timeout=5) as client:
            cpu = client.info("cpu")
            evalsha = client.info("commandstats").get("cmdstat_evalsha", {})
        cpu_seconds += float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
        script_seconds += evalsha.get("usec", 0) / 1e6
    return cpu_seconds, script_seconds


async def measure(store: Store, ports: list[int], args, deadline: float) -> dict:
    """µs per request in this process by mode; for Redis, the server's CPU µs per request."""
    runs = itertools.count()
    await store_calls(store, STORE_BUCKETS, WARM_UP, 1, runs, deadline)
    figures: dict = {}
    for mode, batch in zip(STORE_MODES, (1, args.batch), strict=True):
        before = server_use(ports) if ports else None
        figures[mode] = await store_calls(
            store, STORE_BUCKETS, args.requests, batch, runs, deadline
        )
        if before:
            cpu, script = (
                (after - was) / args.requests * 1e6
                for after, was in zip(server_use(ports), before, strict=True)
            )
            figures[mode] |= {"server_us": cpu, "script_us": script}
    return figures


def run(args) -> dict:
    deadline = time.monotonic() + args.seconds
    folder = Path(tempfile.mkdtemp(prefix="tokengate-capacity-"))
    stores: dict[str, dict] = {}
    truncated = False
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, folder, ignore_errors=True)
        server = RedisServer().start()
        stack.callback(server.stop)
        cluster = LocalCluster(masters=3).start()
        stack.callback(cluster.stop)
        opened: dict[str, tuple[Store, list[int]]] = {
            "memory": (MemoryStore(), []),
            "sqlite": (SqliteStore(folder / "usage.sqlite3"), []),
            "redis": (RedisStore(server.url, prefix="capacity"), [server.port]),
            "redis-cluster": (
                RedisStore(cluster.url, prefix="capacity", cluster=True),
                [node.port for node in cluster.nodes],
            ),
        }
        for kind, (store, ports) in opened.items():
            try:
                stores[kind] = asyncio.run(measured(store, ports, args, deadline))
            except OutOfTime:
                truncated = True
                break
        redis_server = server.version()
    for figures in stores.values():
        if "server_us" in figures["concurrent"]:
            capacity = 1e6 / figures["concurrent"]["server_us"]
            figures["capacity_rps"] = capacity
            figures["gateways"] = capacity * args.busy / args.rate
    return {
        "environment": environment(),
        "requests": args.requests,
        "batch": args.batch,
        "rate": args.rate,
        "busy": args.busy,
        "truncated": truncated,
        "redis_server": redis_server,
        "redis_py": version("redis"),
        "stores": stores,
    }


async def measured(store: Store, ports: list[int], args, deadline: float) -> dict:
    try:
        return await measure(store, ports, args, deadline)
    finally:
        await store.close()


COST_COLUMNS: tuple[Column, ...] = (
    ("reserve µs", "reserve_us", "{:.1f}"),
    ("settle µs", "settle_us", "{:.1f}"),
    ("both µs", "both_us", "{:.1f}"),
    ("server CPU µs", "server_us", "{:.1f}"),
    ("of which scripts µs", "script_us", "{:.1f}"),
)
CAPACITY_COLUMNS: tuple[Column, ...] = (
    ("server CPU µs per request", "server_us", "{:.1f}"),
    ("requests/s per Redis core", "capacity_rps", "{:,.0f}"),
    ("gateways", "gateways", "{:.0f}"),
)


def markdown(report: dict) -> str:
    env = report["environment"]
    stores = report["stores"]
    cut = " (cut short by its time cap)" if report["truncated"] else ""
    rows = [
        ([kind, mode], figures[mode]) for kind, figures in stores.items() for mode in STORE_MODES
    ]
    capacity = [
        ([kind], {**figures["concurrent"], **figures})
        for kind, figures in stores.items()
        if "capacity_rps" in figures
    ]
    return "\n".join(
        [
            f"Python {env['python']}, {env['cpus']} CPU(s), {env['date']}; redis-server "
            f"{report['redis_server']}, redis-py {report['redis_py']}. Reserve + settle on two "
            f"limits, {report['requests']} requests per store and mode, concurrent: batches of "
            f"{report['batch']} gathered{cut}. Server CPU: what redis-server used per request "
            "(every master of the cluster together), of which running the two scripts.",
            "",
            figures_table(["store", "mode"], rows, COST_COLUMNS),
            "",
            f"Gateways per Redis: one Redis core decides 1 s / (server CPU per request) requests "
            f"a second; kept at most {report['busy']:.0%} busy, it serves that many times "
            f"{report['busy']} divided by {report['rate']} requests/s per gateway.",
            "",
            figures_table(["store"], capacity, CAPACITY_COLUMNS),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    options = parser(__doc__)
    options.add_argument("--requests", type=int, default=2000)
    options.add_argument("--batch", type=int, default=32)
    options.add_argument("--rate", type=float, default=100.0, help="requests/s per gateway")
    options.add_argument("--busy", type=float, default=0.5, help="Redis CPU share to plan for")
    options.add_argument("--seconds", type=float, default=120.0, help="time cap of the run")
    args = options.parse_args(argv)
    if not (1 <= args.requests <= MAX_REQUESTS and 1 <= args.batch <= 1024):
        options.error(f"--requests must be 1..{MAX_REQUESTS} and --batch 1..1024")
    if args.rate <= 0 or not 0 < args.busy <= 1 or args.seconds <= 0:
        options.error("--rate and --seconds must be > 0, --busy in (0, 1]")
    emit(run(args), markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
