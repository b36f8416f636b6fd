"""What evaluating ten limits per request costs against one: CPU per request beside plain mitmdump.

Three targets in front of the same mock, each a fresh process per round, taking turns in an order
that rotates between rounds: plain mitmdump (reverse mode, no addon), TokenGate with one limit
(total tokens per minute per key) and TokenGate with ten limits that all apply to every request:
total tokens per minute, hour and day, one for the model's family, two the team shares, prompt
tokens, requests per key and per team, and a USD budget priced per model. Memory store; counts
that never refuse. Figures: the proxy's CPU time per request (all threads, /proc), requests per
second and p50 latency, medians over `--rounds`; ratios to the plain mitmdump of the same round.

Then, in this process, the store's share of it, steadier than a proxy's CPU: a reserve and a
settle on a fresh memory store, one request at a time, in the windows the gate builds from each
of the two configurations (`--store-requests` per round, medians over `--rounds`).

    .venv/bin/python -m scripts.bench.limits [--rounds 3] [--requests 400] [--concurrency 8]
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from tokengate_core.config import load_config
from tokengate_core.keys import hash_key
from tokengate_core.limiter import Rates
from tokengate_core.prices import cost
from tokengate_core.quota import buckets_for
from tokengate_core.stores.memory import MemoryStore

from scripts.bench.bench import (
    STORE_DEMAND,
    STORE_USAGE,
    cpu_seconds,
    ratio,
    rotated,
    store_calls,
)
from scripts.bench.benchclient import drive, encode_request
from scripts.bench.benchkit import (
    PROVIDER_ENV,
    OutOfTime,
    emit,
    environment,
    figures_table,
    gateway,
    median,
    mitmdump,
    mock,
    parser,
    started,
    stop_on_sigterm,
    url_of,
)

TARGETS = ("mitmdump", "one limit", "ten limits")
STORE_TARGETS = ("one limit", "ten limits")
STORE_SECONDS = 120.0  # the in-process part stops after this long
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}
BIG = 10**12  # a count nothing reaches
ONE = f"""\
    token_limits:
      total_tokens:
        - {{count: {BIG}, duration: 1m}}
"""
TEN = f"""\
    token_limits:
      total_tokens:
        - {{count: {BIG}, duration: 1m}}
        - {{count: {BIG}, duration: 1h}}
        - {{count: {BIG}, duration: 1d}}
        - {{count: {BIG}, duration: 1m, models: [gpt-4o*]}}
        - {{count: {BIG}, duration: 1m, scope: proxy}}
        - {{count: {BIG}, duration: 1d, scope: proxy}}
      prompt_tokens:
        - {{count: {BIG}, duration: 1m}}
    request_limits:
      - {{count: {BIG}, duration: 1m}}
      - {{count: {BIG}, duration: 1m, scope: proxy}}
    budgets:
      - {{usd: 1000000, duration: 1d}}
"""
STORE_COLUMNS = [
    ("windows", "limits", "{:.0f}"),
    ("reserve µs", "reserve_us", "{:.1f}"),
    ("settle µs", "settle_us", "{:.1f}"),
    ("both µs", "both_us", "{:.1f}"),
]
COLUMNS = [
    ("CPU ms/req", "cpu_ms", "{:.2f}"),
    ("CPU vs mitmdump", "cpu_ratio", "{:.2f}x"),
    ("req/s", "rps", "{:.0f}"),
    ("p50 ms", "p50_ms", "{:.2f}"),
]


def write_quotas(path: Path, mock_url: str, limits: str, key: str) -> Path:
    path.write_text(
        "prices:\n  gpt-4o-mini: {input: 0.15, output: 0.60}\n"
        "providers:\n  mock:\n"
        f"    base_url: {mock_url}/v1\n    api_key_env: {PROVIDER_ENV}\n"
        "proxies:\n  p:\n    context: /p\n    provider: mock\n"
        f"{limits}"
        f'    keys:\n      bench: {{sha256: "{hash_key(key)}"}}\n'
        "store: {kind: memory}\n",
        encoding="utf-8",
    )
    return path


def measure(port: int, pid: int, path: str, key: str, args) -> dict:
    request = encode_request(port, path, key, BODY)
    began = cpu_seconds(pid)
    run = asyncio.run(drive(port, [request], args.requests, args.concurrency, args.seconds))
    ended = cpu_seconds(pid)
    answered = len(run.latencies)
    if run.failed:
        raise RuntimeError(f"{run.failed} requests were not answered 200: {dict(run.statuses)}")
    latencies = sorted(run.latencies)
    return {
        "requests": answered,
        "cpu_ms": (ended - began) / answered * 1000 if None not in (began, ended) else None,
        "rps": answered / run.seconds if run.seconds else None,
        "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else None,
    }


def one_round(round_: int, folder: Path, args) -> dict:
    provider_key, key = secrets.token_hex(16), "tg-bench-" + secrets.token_hex(8)
    figures = {}
    with contextlib.ExitStack() as stack:
        upstream = started(stack, mock(provider_key))
        mock_url = url_of(upstream, float("inf"))
        for name in rotated(TARGETS, round_):
            if name == "mitmdump":
                child, path = mitmdump(mock_url), "/v1/chat/completions"
            else:
                limits = ONE if name == "one limit" else TEN
                config = write_quotas(
                    folder / f"{round_}-{len(figures)}.yaml", mock_url, limits, key
                )
                child, path = gateway(mock_url, config, provider_key), "/p/chat/completions"
            with contextlib.ExitStack() as running:
                started(running, child)
                port = int(url_of(child, float("inf")).rpartition(":")[2])
                # plain mitmdump forwards the caller's header: the mock wants the provider key
                caller = provider_key if name == "mitmdump" else key
                figures[name] = measure(port, child.popen.pid, path, caller, args)
    base = figures["mitmdump"]["cpu_ms"]
    for name in TARGETS:
        figures[name]["cpu_ratio"] = ratio(figures[name]["cpu_ms"], base)
    return figures


async def store_round(folder: Path, args, deadline: float) -> dict[str, dict[str, float]]:
    """µs per reserve and settle in the windows of each configuration, on a fresh memory store.
    The demand and the usage carry the model's price where a budget applies, as the gate's."""
    figures = {}
    for name in STORE_TARGETS:
        limits = ONE if name == "one limit" else TEN
        quotas = write_quotas(folder / f"store-{name}.yaml", "http://mock.test", limits, "tg-x")
        config = load_config(quotas, check_credentials=False)
        proxy = config.proxies["p"]
        price = config.price_book.override(BODY["model"])
        assert price is not None, "the bench's model is priced in its quotas file"
        demand = replace(STORE_DEMAND, rates=Rates(price.input, price.output))
        usage = replace(STORE_USAGE, cost=cost(STORE_USAGE, price))
        store = MemoryStore()
        try:
            buckets = buckets_for(proxy, "bench", BODY["model"])
            calls = (store, buckets, args.store_requests, 1, itertools.count(), deadline)
            figures[name] = await store_calls(*calls, demand=demand, usage=usage)
            figures[name]["limits"] = len(buckets)
        finally:
            await store.close()
    return figures


def run(args) -> dict:
    rounds, stores = [], []
    with tempfile.TemporaryDirectory(prefix="tokengate-limits-") as folder:
        for round_ in range(args.rounds):
            rounds.append(one_round(round_, Path(folder), args))
        deadline = time.monotonic() + STORE_SECONDS
        for _ in range(args.rounds):
            try:
                stores.append(asyncio.run(store_round(Path(folder), args, deadline)))
            except OutOfTime:  # the rounds measured so far are reported
                break
    targets = {
        name: {
            field: median([r[name][field] for r in rounds])
            for field in ("cpu_ms", "cpu_ratio", "rps", "p50_ms")
        }
        for name in TARGETS
    }
    ten, one = targets["ten limits"]["cpu_ms"], targets["one limit"]["cpu_ms"]
    in_process = {
        name: {
            field: median([r[name][field] for r in stores])
            for field in ("limits", "reserve_us", "settle_us", "both_us")
        }
        for name in STORE_TARGETS
    }
    return {
        "environment": environment(),
        "rounds": args.rounds,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "targets": targets,
        "ten_vs_one": median([ratio(ten, one)]),
        "ten_minus_one_ms": None if None in (ten, one) else round(ten - one, 3),
        "store_requests": args.store_requests,
        "in_process": in_process,
    }


def markdown(report: dict) -> str:
    rows = [([name], figures) for name, figures in report["targets"].items()]
    stores = [([name], figures) for name, figures in report["in_process"].items()]
    return (
        f"{report['requests']} requests per target and round over {report['concurrency']} "
        f"connections, medians over {report['rounds']} round(s); ten limits cost "
        f"{report['ten_minus_one_ms']} ms of CPU per request more than one "
        f"({report['ten_vs_one']}x).\n\n"
        + figures_table(["target"], rows, COLUMNS)
        + f"\n\nIn process: reserve + settle on a fresh memory store, one request at a time, "
        f"{report['store_requests']} requests per round, medians over {report['rounds']} "
        "round(s).\n\n" + figures_table(["target"], stores, STORE_COLUMNS)
    )


def main(argv: list[str] | None = None) -> int:
    options = parser(__doc__)
    options.add_argument("--rounds", type=int, default=3)
    options.add_argument("--requests", type=int, default=400)
    options.add_argument("--concurrency", type=int, default=8)
    options.add_argument("--seconds", type=float, default=60.0, help="time cap per target")
    options.add_argument("--store-requests", type=int, default=2000, help="in process, per round")
    args = options.parse_args(argv)
    stop_on_sigterm()
    emit(run(args), markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
