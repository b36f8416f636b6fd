"""TokenGate beside plain mitmdump: throughput, latency, memory, startup, estimates, store costs.

One session, everything on 127.0.0.1. Phases (`--phases`, all by default):

- load: small non-streamed chat requests at each `--concurrency`, to every target in turn:
  `direct` (the mock itself), `mitmdump` (plain, reverse mode, no addon), `noop` (mitmdump with
  `scripts/bench/noop_addons.py`: as many addon objects as TokenGate, with the same hooks, doing
  nothing: the floor mitmproxy's addon dispatch puts under TokenGate), TokenGate on the
  `memory`, `sqlite` and `redis` stores, and `metrics`: the memory store with
  `tokengate_metrics` on (its page scraped once per level, as Prometheus would). Req/s, p50
  and p99 latency, the proxy's CPU time per request (all its threads; for `direct`, the
  mock's), startup time and the proxy's peak RSS, each also as a ratio to the plain mitmdump of
  the same round. `metrics` also gets its CPU time per request as a ratio to `memory` of the
  same round: what serving metrics costs. CPU time per request leaves out the time
  the proxy waited for a CPU, so it is a second view of the gate's cost when other work shares
  the machine (it still varies with what shares the caches).
- stream: streamed chat requests, time to first body byte, the same targets.
- estimate: `dialects.openai.estimate_prompt` on 1k, 10k and 100k-token prompts, in this process.
- keys: a gateway whose quotas file holds `--keys` keys, each key sending one request;
  startup time and peak RSS against a plain mitmdump that served as many requests.
- stores: one limit check per store, in this process: reserve and settle, µs per call.
- dispatch: mitmproxy's dispatch of one flow's events through mitmdump's default addons, alone
  and with the `noop` target's addons, in this process: CPU µs per flow (the floor, less noisy).

Every run starts fresh processes (mock, proxy, redis-server), so startup is timed each round;
targets take turns in an order that rotates between rounds, so drift hits all alike; figures
are medians over `--rounds`, ratios medians of the per-round ratios. Every phase has a time
budget and every level a request count and a time cap; a run cut short says so.

    .venv/bin/python -m scripts.bench [--rounds 3] [--requests 400] [--concurrency 1,8,32]
        [--targets direct,mitmdump,noop,memory,sqlite,redis,metrics] [--phases load,...] [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import secrets
import sqlite3
import sys
import tempfile
import time
import urllib.request
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tokengate_core import tokens
from tokengate_core.config import REQUESTS, Limit
from tokengate_core.dialects.openai import estimate_prompt
from tokengate_core.keys import hash_key
from tokengate_core.limiter import Bucket, Demand, Usage
from tokengate_core.stores import Store
from tokengate_core.stores.memory import MemoryStore
from tokengate_core.stores.redis import RedisStore
from tokengate_core.stores.sqlite import SqliteStore
from tokengate_core.tools.children import Child
from tokengate_core.tools.mock import completion_pieces

from scripts.bench import benchkit, benchprofile
from scripts.bench.benchclient import Run, drive, encode_request
from scripts.bench.benchkit import (
    Budget,
    Column,
    OutOfTime,
    cell,
    figures_table,
    median,
    percentile,
    started,
    table,
)
from scripts.bench.redis_server import RedisServer

TARGETS = ("direct", "mitmdump", "noop", "memory", "sqlite", "redis", "metrics")
GATES = ("memory", "sqlite", "redis")
METRICS = "metrics"  # the memory store with tokengate_metrics on
METRICS_READY = re.compile(r"metrics at (\S+)")
# Redis keeps the keys' windows in redis-server, not in the gateway: its RSS would not show them.
KEYS_TARGETS = ("mitmdump", "memory", "sqlite")
BASELINE = "mitmdump"
PHASES = ("load", "stream", "estimate", "keys", "stores", "dispatch")
LABELS = {
    "direct": "direct (mock)",
    "mitmdump": "plain mitmdump",
    "noop": "mitmdump, no-op addons",
    "memory": "TokenGate, memory",
    "sqlite": "TokenGate, SQLite",
    "redis": "TokenGate, Redis",
    "metrics": "TokenGate, memory, metrics on",
}
NOOP_ADDONS = str(Path(__file__).with_name("noop_addons.py"))
CONTEXT = "/bench"
MODEL = "gpt-4o-mini"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 5}
STREAM_BODY = {**BODY, "stream": True}
STREAM_DELAY = "0.002"  # seconds between the mock's stream events (its default is 0.01)
ESTIMATE_SIZES = (1_000, 10_000, 100_000)
ESTIMATE_TARGET_MS = 50.0
TARGET_THROUGHPUT = {"memory": 0.9, "sqlite": 0.9, "redis": 0.8}
TARGET_ADDED_P50_MS = 1.0
TARGET_RSS = 1.3
TARGET_METRICS_CPU = 1.05  # CPU per request with metrics on, vs the same gate without
# The store phase: a typical proxy's two limits, with counts that never refuse.
STORE_BUCKETS = (
    Bucket("bench:caller:total_tokens-1m", Limit("total_tokens", 10**12, 60, "1m")),
    Bucket("bench:caller:requests-1m", Limit(REQUESTS, 10**12, 60, "1m")),
)
STORE_DEMAND = Demand(20, 100)
STORE_USAGE = Usage(20, 42)
STORE_MODES = ("sequential", "concurrent")
MAX_COUNT = 100_000  # for any count option: rounds, requests, keys
DISPATCH_BATCHES = 10  # per round: the two chains take turns this often


# --- targets --------------------------------------------------------------------------------


@dataclass
class Session:
    """What every run of one benchmark session shares."""

    folder: Path
    provider_key: str = field(default_factory=lambda: "sk-bench-" + secrets.token_hex(16))
    caller_key: str = field(default_factory=lambda: "tg-bench-" + secrets.token_hex(16))
    runs: Iterator[int] = field(default_factory=itertools.count)


@dataclass
class Target:
    """A running target: where to send requests, and the process whose memory counts."""

    name: str
    run: int  # numbers the session's launches
    process: Child  # the proxy; for `direct`, the mock
    port: int
    path: str
    key: str
    startup: float

    @property
    def gated(self) -> bool:
        return self.name in (*GATES, METRICS)

    def requests(self, body: dict, keys: Sequence[str] = ()) -> list[bytes]:
        """The request to send, once per caller key (`keys`; default the target's own)."""
        return [encode_request(self.port, self.path, key, body) for key in keys or [self.key]]


def write_quotas(path: Path, mock_url: str, store: str, keys: dict[str, str]) -> Path:
    """One proxy whose limit never refuses (the benchmark measures the path, not 429s)."""
    lines = [
        "providers:",
        "  mock:",
        f"    base_url: {mock_url}/v1",
        f"    api_key_env: {benchkit.PROVIDER_ENV}",
        "    hosts: [127.0.0.1]",
        "proxies:",
        "  bench:",
        f"    context: {CONTEXT}",
        "    provider: mock",
        "    token_limits:",
        "      total_tokens:",
        "        - {count: 1000000000000, duration: 1m}",
        "    keys:",
        *(f'      {name}: {{sha256: "{digest}"}}' for name, digest in keys.items()),
        f"store: {store}",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class Upstream:
    """The mock provider of a round (or of the keys phase)."""

    process: Child
    url: str


@contextlib.contextmanager
def upstream(session: Session) -> Iterator[Upstream]:
    with contextlib.ExitStack() as stack:
        mock = started(stack, benchkit.mock(session.provider_key, "--stream-delay", STREAM_DELAY))
        yield Upstream(mock, benchkit.url_of(mock, time.monotonic() + benchkit.STARTUP_TIMEOUT))


@contextlib.contextmanager
def launched(
    name: str,
    session: Session,
    provider: Upstream,
    deadline: float,
    keys: dict[str, str] | None = None,
    streaming: bool = False,
) -> Iterator[Target]:
    """Fresh processes for one target (proxy, redis-server), stopped on leaving.

    `direct` is the mock itself. `keys` (name -> sha256) replaces the session's one caller key
    in the quotas file; `streaming` makes the plain mitmdump stream answers as the gate does.
    """
    run = next(session.runs)
    mock, mock_url = provider.process, provider.url
    with contextlib.ExitStack() as stack:
        provider_path = "/v1/chat/completions"
        if name == "direct":
            process, key, path = mock, session.provider_key, provider_path
        elif name in (BASELINE, "noop"):
            # By default mitmdump buffers a whole SSE answer before passing it on; the gate
            # streams it, so the streamed phase compares with a mitmdump that streams bodies.
            extra = ("--set", "stream_large_bodies=1") if streaming else ()
            script = ("-s", NOOP_ADDONS) if name == "noop" else ()
            process = started(stack, benchkit.mitmdump(mock_url, *script, *extra))
            key, path = session.provider_key, provider_path
        else:
            store = {"memory": "{kind: memory}", "sqlite": "{kind: sqlite, path: usage.sqlite3}"}
            store[METRICS] = store["memory"]
            if name == "redis":
                redis = RedisServer().start()
                stack.callback(redis.stop)
                store["redis"] = f"{{kind: redis, url: '{redis.url}'}}"
            folder = session.folder / f"{run}-{name}"
            folder.mkdir()
            own = keys or {"bench": hash_key(session.caller_key)}
            config = write_quotas(folder / "quotas.yaml", mock_url, store[name], own)
            extra = ("--set", "tokengate_metrics=127.0.0.1:0") if name == METRICS else ()
            gateway = benchkit.gateway(mock_url, config, session.provider_key, *extra)
            process = started(stack, gateway)
            key, path = session.caller_key, f"{CONTEXT}/chat/completions"
        port = int(benchkit.url_of(process, deadline).rsplit(":", 1)[1])
        assert process.startup is not None
        yield Target(name, run, process, port, path, key, process.startup)


def rotated(names: Sequence[str], round_: int) -> list[str]:
    shift = round_ % len(names)
    return [*names[shift:], *names[:shift]]


def cpu_seconds(pid: int) -> float | None:
    """CPU time a process has used so far, user and system, all threads (Linux /proc); None
    where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def summary_of(run: Run) -> dict:
    """One level's figures; latencies in ms."""
    answered = bool(run.latencies)
    return {
        "requests": len(run.latencies),
        "non_200": run.failed,
        "statuses": {str(status): count for status, count in sorted(run.statuses.items())},
        "cut": run.cut,
        "rps": len(run.latencies) / run.seconds if answered and run.seconds else None,
        "p50_ms": percentile(run.latencies, 50) * 1000 if answered else None,
        "p99_ms": percentile(run.latencies, 99) * 1000 if answered else None,
        "client_cpu_s": run.client_cpu,
        "client_cpu_share": run.client_cpu / run.seconds if run.seconds else None,
    }


def add_ratios(per_target: dict[str, dict], figures: Sequence[str]) -> None:
    """Each figure divided by plain mitmdump's of the same round, as `<figure>_ratio`."""
    base = per_target.get(BASELINE, {})
    for figures_of in per_target.values():
        for name in figures:
            figures_of[f"{name}_ratio"] = ratio(figures_of.get(name), base.get(name))


def by_target(rounds: list[dict[str, dict]]) -> dict[str, list[dict]]:
    """Rounds of {target: figures} as {target: [its figures in each round]}."""
    return {
        target: [one[target] for one in rounds if target in one]
        for target in dict.fromkeys(t for one in rounds for t in one)
    }


def merged(seen: list[dict], names: Sequence[str]) -> dict:
    """The median over rounds of each of `names`; requests and non-200 answers summed."""
    figures = {name: median([one.get(name) for one in seen]) for name in names}
    figures["requests"] = sum(one["requests"] for one in seen)
    figures["non_200"] = sum(one["non_200"] for one in seen)
    figures["cut"] = any(one["cut"] for one in seen)
    return figures


# --- phases ---------------------------------------------------------------------------------


LOAD_FIGURES = ("rps", "p50_ms", "p99_ms", "cpu_ms")


def load_run(target: Target, args, budget: Budget) -> dict:
    """Every concurrency level against one running target, then its peak RSS."""
    levels = {}
    expect = b"x-tokens-consumed" if target.gated else None
    with contextlib.ExitStack() as stack:
        if args.profile and target.name != "direct":
            output = args.profile / f"{target.name}-{target.run}.folded"
            stack.enter_context(benchprofile.sampled(target.process.popen.pid, output))
        for concurrency in args.concurrency:
            seconds = min(args.level_seconds, budget.left())
            if seconds <= 0:
                budget.exhausted = True
                break
            requests = target.requests(BODY)
            began = cpu_seconds(target.process.popen.pid)
            run = asyncio.run(
                drive(target.port, requests, args.requests, concurrency, seconds, False, expect)
            )
            figures = levels[str(concurrency)] = summary_of(run)
            if target.name == METRICS:
                scrape(target)  # within the measured time, as Prometheus would
            ended = cpu_seconds(target.process.popen.pid)
            answered = figures["requests"]
            known = None not in (began, ended) and answered
            figures["cpu_ms"] = (ended - began) / answered * 1000 if known else None
            budget.exhausted |= run.cut
    rss = target.process.memory_kib()
    return {
        "startup_ms": target.startup * 1000,
        "rss_mib": rss / 1024 if rss else None,
        "levels": levels,
    }


def scrape(target: Target) -> None:
    """Read the metrics page once (the gate logged where it serves it)."""
    found = METRICS_READY.search(target.process.output)
    if found is None:
        raise RuntimeError(f"no metrics address in the gate's log:\n{target.process.output}")
    with urllib.request.urlopen(found.group(1), timeout=10) as page:
        if b"tokengate_requests_total" not in page.read():
            raise RuntimeError("the metrics page counts no request")


def stream_run(target: Target, args, budget: Budget) -> dict:
    seconds = min(args.level_seconds, budget.left())
    if seconds <= 0:
        budget.exhausted = True
        return summary_of(Run(cut=True))
    requests = target.requests(STREAM_BODY)
    run = asyncio.run(drive(target.port, requests, args.stream_requests, 1, seconds, True))
    budget.exhausted |= run.cut
    figures = summary_of(run)
    figures["ttfb_p50_ms"], figures["ttfb_p99_ms"] = figures.pop("p50_ms"), figures.pop("p99_ms")
    return figures


def proxy_phases(session: Session, args, budgets: dict[str, Budget]) -> dict:
    """The load and stream phases: every target in each round, in rotating order."""
    load_rounds: list[dict[str, dict]] = []
    stream_rounds: list[dict[str, dict]] = []
    runners = {"load": load_run, "stream": stream_run}
    for round_ in range(args.rounds):
        figures: dict[str, dict[str, dict]] = {phase: {} for phase in budgets}
        with upstream(session) as provider:
            for name, phase in itertools.product(rotated(args.targets, round_), budgets):
                budget = budgets[phase]
                if budget.left() <= 0:
                    budget.exhausted = True
                    continue
                streaming = phase == "stream"
                deadline = budget.deadline()
                with (
                    budget.running(),
                    launched(name, session, provider, deadline, streaming=streaming) as target,
                ):
                    figures[phase][name] = runners[phase](target, args, budget)
        if load := figures.get("load"):
            add_load_ratios(load, args.concurrency)
            load_rounds.append(load)
        if stream := figures.get("stream"):
            add_ratios(stream, ("ttfb_p50_ms", "ttfb_p99_ms"))
            stream_rounds.append(stream)
    result = {}
    if "load" in budgets:
        result["load"] = summarize_load(load_rounds, args, budgets["load"])
    if "stream" in budgets:
        names = ("ttfb_p50_ms", "ttfb_p99_ms", "ttfb_p50_ms_ratio", "ttfb_p99_ms_ratio")
        result["stream"] = {
            "requests": args.stream_requests,
            "rounds": len(stream_rounds),
            "truncated": budgets["stream"].exhausted,
            "targets": {t: merged(seen, names) for t, seen in by_target(stream_rounds).items()},
        }
    return result


def add_load_ratios(load: dict[str, dict], concurrency: Sequence[int]) -> None:
    """One round's load figures against its plain mitmdump: per target, and per level."""
    add_ratios(load, ("startup_ms", "rss_mib"))
    for level in map(str, concurrency):
        per_level = {
            name: one["levels"][level] for name, one in load.items() if level in one["levels"]
        }
        add_ratios(per_level, LOAD_FIGURES)
        base = per_level.get(BASELINE, {}).get("p50_ms")
        for figures in per_level.values():
            p50 = figures["p50_ms"]
            figures["added_p50_ms"] = p50 - base if None not in (p50, base) else None
        if METRICS in per_level:
            figures = per_level[METRICS]
            without = per_level.get("memory", {}).get("cpu_ms")
            figures["cpu_ms_vs_memory"] = ratio(figures["cpu_ms"], without)


def summarize_load(rounds: list[dict[str, dict]], args, budget: Budget) -> dict:
    """Medians over rounds, per target and per concurrency level."""
    level_names = (*LOAD_FIGURES, *(f"{name}_ratio" for name in LOAD_FIGURES), "added_p50_ms")
    level_names += ("client_cpu_s", "client_cpu_share", "cpu_ms_vs_memory")
    targets: dict[str, dict] = {}
    for name, seen in by_target(rounds).items():
        targets[name] = {
            key: median([one.get(key) for one in seen])
            for key in ("startup_ms", "startup_ms_ratio", "rss_mib", "rss_mib_ratio")
        }
        targets[name]["levels"] = {
            level: merged(runs, level_names)
            for level in map(str, args.concurrency)
            if (runs := [one["levels"][level] for one in seen if level in one["levels"]])
        }
    return {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "rounds": len(rounds),
        "truncated": budget.exhausted,
        "targets": targets,
    }


def estimate_phase(args, budget: Budget) -> dict:
    """Prompt-estimate time on chat prompts of verified size, median of repeats, in ms."""
    tokens.preload()
    deadline = budget.deadline()
    sizes = {}
    for size in ESTIMATE_SIZES:
        text = "".join(completion_pieces(MODEL, size))
        counted = tokens.count_text(text, MODEL)
        if counted != size:
            raise RuntimeError(f"built a {size}-token prompt that counts {counted} tokens")
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
        repeats = 1 if args.quick else max(5, min(50, 200_000 // size))
        times, estimate = [], 0
        for _ in range(repeats):
            if times and time.monotonic() > deadline:
                budget.exhausted = True
                break
            began = time.perf_counter()
            estimate = estimate_prompt("chat/completions", body)
            times.append((time.perf_counter() - began) * 1000)
        sizes[str(size)] = {
            "text_tokens": counted,
            "estimate": estimate,
            "repeats": len(times),
            "ms": median(times),
            "target_ms": ESTIMATE_TARGET_MS,
        }
    return {"truncated": budget.exhausted, "sizes": sizes}


def keys_phase(session: Session, args, budget: Budget, startups: dict[str, float]) -> dict:
    """A gateway with `--keys` keys, each sending one request, beside a plain mitmdump.

    Memory grown while serving them, beyond what plain mitmdump grew serving as many requests,
    is what the keys' state costs; startup beyond the load phase's (`startups`, one key) is
    what loading their config costs.
    """
    secrets_ = [f"tg-bench-{i}-{secrets.token_hex(8)}" for i in range(args.keys)]
    keys = {f"k{i}": hash_key(secret) for i, secret in enumerate(secrets_)}
    concurrency = max(args.concurrency)
    targets = {}
    with budget.running(), upstream(session) as provider:
        for name in [t for t in args.targets if t in KEYS_TARGETS]:
            seconds = min(args.level_seconds * 4, budget.left())
            if seconds <= 0:
                budget.exhausted = True
                break
            with launched(name, session, provider, budget.deadline(), keys) as target:
                requests = target.requests(BODY, secrets_ if target.gated else ())
                expect = b"x-tokens-consumed" if target.gated else None
                # One request first: the gate builds its tokenizer in the background at start,
                # and that build must not be counted as the keys' state.
                asyncio.run(drive(target.port, requests, 1, 1, seconds, False, expect))
                idle = target.process.memory_kib("VmRSS")
                run = asyncio.run(
                    drive(target.port, requests, args.keys, concurrency, seconds, False, expect)
                )
                peak = target.process.memory_kib()
            budget.exhausted |= run.cut
            figures = summary_of(run)
            startup = target.startup * 1000
            targets[name] = {
                "startup_ms": startup,
                "startup_vs_one_key_ms": startup - startups[name] if name in startups else None,
                "requests": figures["requests"],
                "non_200": figures["non_200"],
                "rps": figures["rps"],
                "rss_mib": peak / 1024 if peak else None,
                "grown_mib": (peak - idle) / 1024 if peak and idle else None,
            }
    add_ratios(targets, ("rss_mib",))
    base = targets.get(BASELINE, {}).get("grown_mib")
    for figures in targets.values():
        grown = figures["grown_mib"]
        extra = grown - base if None not in (grown, base) else None
        figures["kib_per_key"] = extra * 1024 / args.keys if extra is not None else None
    return {
        "keys": args.keys,
        "concurrency": concurrency,
        "truncated": budget.exhausted,
        "targets": targets,
    }


async def store_round(
    kinds: Sequence[str], folder: Path, redis_url: str | None, args, round_: int, deadline: float
) -> dict[str, dict[str, dict]]:
    """µs per reserve and per settle, by store and mode, for one round of fresh stores."""
    figures: dict[str, dict[str, dict]] = {}
    for kind in kinds:
        if kind == "memory":
            store: Store = MemoryStore()
        elif kind == "sqlite":
            store = SqliteStore(folder / f"round-{round_}.sqlite3")
        else:
            assert redis_url is not None
            store = RedisStore(redis_url, prefix=f"bench-{round_}")
        try:
            runs = itertools.count()
            warm_up = min(50, args.store_requests)
            await store_calls(store, STORE_BUCKETS, warm_up, 1, runs, deadline)
            figures[kind] = {
                mode: await store_calls(
                    store, STORE_BUCKETS, args.store_requests, batch, runs, deadline
                )
                for mode, batch in zip(STORE_MODES, (1, max(args.concurrency)), strict=True)
            }
        finally:
            await store.close()
    return figures


async def store_calls(
    store: Store,
    buckets: tuple[Bucket, ...],
    requests: int,
    batch: int,
    runs: Iterator[int],
    deadline: float,
    demand: Demand = STORE_DEMAND,
    usage: Usage = STORE_USAGE,
) -> dict[str, float]:
    """`requests` reserves then settles, `batch` gathered at a time: µs per call of each."""
    run = next(runs)
    reserving = settling = 0.0
    for start in range(0, requests, batch):
        if time.monotonic() > deadline:
            raise OutOfTime
        ids = [f"{run}-{start + i}" for i in range(min(batch, requests - start))]
        began = time.perf_counter()
        held = await together([store.reserve(i, buckets, demand) for i in ids])
        reserved = time.perf_counter()
        if any(reservation is None for _, reservation in held):
            raise RuntimeError("the store benchmark's limits refused a request")
        await together([store.settle(reservation, usage) for _, reservation in held])
        reserving += reserved - began
        settling += time.perf_counter() - reserved
    return {
        "reserve_us": reserving / requests * 1e6,
        "settle_us": settling / requests * 1e6,
        "both_us": (reserving + settling) / requests * 1e6,
    }


async def together[T](calls: list[Coroutine[Any, Any, T]]) -> list[T]:
    """The calls' results; one call is awaited as such (a gathered one would pay for a task)."""
    if len(calls) == 1:
        return [await calls[0]]
    return await asyncio.gather(*calls)


def stores_phase(session: Session, args, budget: Budget) -> dict:
    """The cost of one limit check per store, in process: what the gate pays per request.

    Memory, the base of the ratios, always; the other stores when among `--targets`.
    """
    kinds = [kind for kind in GATES if kind == "memory" or kind in args.targets]
    rounds = []
    with budget.running(), contextlib.ExitStack() as stack:
        deadline = budget.deadline()
        server = RedisServer().start() if "redis" in kinds else None
        if server:
            stack.callback(server.stop)
        url = server.url if server else None
        for round_ in range(args.rounds):
            try:
                rounds.append(
                    asyncio.run(store_round(kinds, session.folder, url, args, round_, deadline))
                )
            except OutOfTime:
                budget.exhausted = True
                break
        redis_server = server.version() if server else None
    stores: dict[str, dict] = {}
    for kind in kinds:
        stores[kind] = {}
        for mode in STORE_MODES:
            seen = [one[kind][mode] for one in rounds]
            stores[kind][mode] = {
                name: median([one[name] for one in seen], 1)
                for name in ("reserve_us", "settle_us", "both_us")
            }
            stores[kind][mode]["both_ratio_to_memory"] = median(
                [one[kind][mode]["both_us"] / one["memory"][mode]["both_us"] for one in rounds], 2
            )
    return {
        "requests": args.store_requests,
        "batch": max(args.concurrency),
        "rounds": len(rounds),
        "truncated": budget.exhausted,
        "redis_server": redis_server,
        "redis_py": version("redis"),
        "sqlite": sqlite3.sqlite_version,
        "stores": stores,
    }


class Scripted:
    """Where `-s` puts a script's addons: ScriptLoader -> Script -> the module -> its `addons`."""

    def __init__(self, addons: list) -> None:
        self.addons = [SimpleNamespace(addons=[SimpleNamespace(addons=addons)])]


def dispatch_phase(args, budget: Budget) -> dict:
    """mitmproxy's dispatch of one flow's events (with the `update` after each) through
    mitmdump's default addons, alone and with `scripts/bench/noop_addons.py`'s twins: µs of CPU per
    flow, in this process, the `noop` target's floor without the network's noise."""
    from mitmproxy import options
    from mitmproxy.proxy.layers import http as layers
    from mitmproxy.test import tflow
    from mitmproxy.tools.dump import DumpMaster

    from scripts.bench import noop_addons

    async def measure() -> dict[str, list[float]]:
        masters = {}
        for name in (BASELINE, "noop"):
            master = DumpMaster(options.Options(), with_termlog=False, with_dumper=False)
            masters[name] = master
            if name == "noop":
                master.addons.add(Scripted(noop_addons.addons))
        flow = tflow.tflow(resp=True)
        hooks = (layers.HttpRequestHeadersHook, layers.HttpRequestHook,
                 layers.HttpResponseHeadersHook, layers.HttpResponseHook)  # fmt: skip
        events = [hook(flow) for hook in hooks]
        times: dict[str, list[float]] = {name: [] for name in masters}
        deadline = budget.deadline()
        for _ in range(args.rounds * DISPATCH_BATCHES):  # the two take turns, batch by batch
            if time.monotonic() > deadline:
                budget.exhausted = True
                break
            for name, master in masters.items():
                began = time.process_time()
                for _ in range(args.dispatch_flows):
                    for event in events:
                        await master.addons.handle_lifecycle(event)
                times[name].append((time.process_time() - began) / args.dispatch_flows * 1e6)
        return times

    with budget.running():
        times = asyncio.run(measure())
    figures = {name: {"us_per_flow": median(seen, 1)} for name, seen in times.items()}
    base, noop = (figures[name]["us_per_flow"] for name in (BASELINE, "noop"))
    figures["noop"]["added_us"] = round(noop - base, 1) if None not in (base, noop) else None
    figures["noop"]["ratio"] = ratio(noop, base)
    return {
        "flows": args.dispatch_flows,
        "batches": len(times[BASELINE]),
        "truncated": budget.exhausted,
        "addons": len(noop_addons.addons),
        "targets": figures,
    }


# --- targets met ----------------------------------------------------------------------------


def verdicts(report: dict) -> list[dict]:
    """The issue's targets, each with the figure measured and whether it is met."""
    rows = []

    def check(what: str, value: float | None, limit: float, at_most: bool) -> None:
        met = None if value is None else (value <= limit if at_most else value >= limit)
        rows.append({"target": what, "value": value, "limit": limit, "met": met})

    targets = report.get("load", {}).get("targets", {})
    for store, floor in TARGET_THROUGHPUT.items():
        for level, figures in targets.get(store, {}).get("levels", {}).items():
            check(f"{store}: req/s vs mitmdump at c={level}", figures["rps_ratio"], floor, False)
    for store in GATES:
        level = targets.get(store, {}).get("levels", {}).get("1")
        if level:
            check(
                f"{store}: added p50 at c=1 (ms)", level["added_p50_ms"], TARGET_ADDED_P50_MS, True
            )
        if store in targets:
            check(
                f"{store}: peak RSS vs mitmdump", targets[store]["rss_mib_ratio"], TARGET_RSS, True
            )
    for level, figures in targets.get(METRICS, {}).get("levels", {}).items():
        check(
            f"metrics on: CPU/req vs memory at c={level}",
            figures.get("cpu_ms_vs_memory"),
            TARGET_METRICS_CPU,
            True,
        )
    largest = report.get("estimate", {}).get("sizes", {}).get(str(ESTIMATE_SIZES[-1]))
    if largest:
        check(
            f"{ESTIMATE_SIZES[-1]:,}-token estimate (ms)", largest["ms"], ESTIMATE_TARGET_MS, True
        )
    return rows


# --- output ---------------------------------------------------------------------------------

LOAD_COLUMNS: tuple[Column, ...] = (
    ("req/s", "rps", "{:.0f}"),
    ("p50 ms", "p50_ms", "{:.2f}"),
    ("p99 ms", "p99_ms", "{:.2f}"),
    ("req/s vs mitmdump", "rps_ratio", "{:.2f}x"),
    ("p50 vs mitmdump", "p50_ms_ratio", "{:.2f}x"),
    ("p99 vs mitmdump", "p99_ms_ratio", "{:.2f}x"),
    ("added p50 ms", "added_p50_ms", "{:.2f}"),
    ("proxy CPU ms/req", "cpu_ms", "{:.2f}"),
    ("CPU vs mitmdump", "cpu_ms_ratio", "{:.2f}x"),
    ("non-200", "non_200", "{:.0f}"),
)
PROCESS_COLUMNS: tuple[Column, ...] = (
    ("startup ms", "startup_ms", "{:.0f}"),
    ("vs mitmdump", "startup_ms_ratio", "{:.2f}x"),
    ("peak RSS MiB", "rss_mib", "{:.1f}"),
    ("vs mitmdump", "rss_mib_ratio", "{:.2f}x"),
)
STREAM_COLUMNS: tuple[Column, ...] = (
    ("TTFB p50 ms", "ttfb_p50_ms", "{:.2f}"),
    ("TTFB p99 ms", "ttfb_p99_ms", "{:.2f}"),
    ("p50 vs mitmdump", "ttfb_p50_ms_ratio", "{:.2f}x"),
    ("p99 vs mitmdump", "ttfb_p99_ms_ratio", "{:.2f}x"),
    ("non-200", "non_200", "{:.0f}"),
)
ESTIMATE_COLUMNS: tuple[Column, ...] = (
    ("estimate", "estimate", "{:.0f}"),
    ("repeats", "repeats", "{:.0f}"),
    ("ms", "ms", "{:.2f}"),
    ("target ms", "target_ms", "{:.0f}"),
)
KEYS_COLUMNS: tuple[Column, ...] = (
    ("startup ms", "startup_ms", "{:.0f}"),
    ("vs 1 key ms", "startup_vs_one_key_ms", "{:.0f}"),
    ("requests", "requests", "{:.0f}"),
    ("non-200", "non_200", "{:.0f}"),
    ("req/s", "rps", "{:.0f}"),
    ("peak RSS MiB", "rss_mib", "{:.1f}"),
    ("vs mitmdump", "rss_mib_ratio", "{:.2f}x"),
    ("grown MiB", "grown_mib", "{:.1f}"),
    ("KiB per key", "kib_per_key", "{:.2f}"),
)
DISPATCH_COLUMNS: tuple[Column, ...] = (
    ("µs per flow", "us_per_flow", "{:.1f}"),
    ("added µs", "added_us", "{:.1f}"),
    ("vs mitmdump", "ratio", "{:.3f}x"),
)
STORE_COLUMNS: tuple[Column, ...] = (
    ("reserve µs", "reserve_us", "{:.1f}"),
    ("settle µs", "settle_us", "{:.1f}"),
    ("both µs", "both_us", "{:.1f}"),
    ("both vs memory", "both_ratio_to_memory", "{:.2f}x"),
)


def markdown(report: dict) -> str:
    """One table per phase, each under a line saying how it was measured."""
    env = report["environment"]
    out = [
        f"mitmproxy {env['mitmproxy']}, Python {env['python']}, {env['cpus']} CPU(s), "
        f"{env['date']}, {report['seconds']:.0f} s. Ratios are medians of per-round ratios to "
        "plain mitmdump; TokenGate runs with its defaults (audit ledger on), one caller key and a "
        "quota that never refuses."
    ]
    if load := report.get("load"):
        targets = load["targets"].items()
        shares = [f["client_cpu_share"] or 0 for _, t in targets for f in t["levels"].values()]
        out += section(
            f"Non-streamed chat (max_tokens 5), {load['requests']} requests per target, "
            f"concurrency level and round over keep-alive connections, medians over "
            f"{load['rounds']} round(s){truncation(load)}. The client used at most "
            f"{max(shares, default=0):.0%} of one core.",
            figures_table(
                ["target", "concurrency"],
                [([LABELS[n], c], f) for n, t in targets for c, f in t["levels"].items()],
                LOAD_COLUMNS,
            ),
        )
        out += ["", figures_table(["target"], [([LABELS[n]], t) for n, t in targets],
                                  PROCESS_COLUMNS)]  # fmt: skip
    if stream := report.get("stream"):
        out += section(
            f"Streamed chat (`stream: true`; the mock sends an event every 2 ms), "
            f"{stream['requests']} sequential requests per target and round, medians over "
            f"{stream['rounds']} round(s){truncation(stream)}. Time to first byte: from the "
            "request written to the first body byte; plain mitmdump here with "
            "`stream_large_bodies=1`, so that it streams too (by default it buffers the answer).",
            figures_table(
                ["target"], [([LABELS[n]], f) for n, f in stream["targets"].items()], STREAM_COLUMNS
            ),
        )
    if estimate := report.get("estimate"):
        out += section(
            "Prompt estimate (`dialects.openai.estimate_prompt`, one chat message of lorem ipsum "
            f"whose token count is checked first), median of repeats{truncation(estimate)}.",
            figures_table(
                ["prompt tokens"],
                [([f"{int(size):,}"], f) for size, f in estimate["sizes"].items()],
                ESTIMATE_COLUMNS,
            ),
        )
    if keys := report.get("keys"):
        out += section(
            f"{keys['keys']:,} keys in quotas.yaml, one request from each "
            f"({keys['concurrency']} connections); plain mitmdump served as many requests"
            f"{truncation(keys)}. Startup vs 1 key: beyond the load phase's median. Grown: peak "
            "RSS minus RSS before the requests; per key: grown beyond plain mitmdump's growth.",
            figures_table(
                ["target"], [([LABELS[n]], f) for n, f in keys["targets"].items()], KEYS_COLUMNS
            ),
        )
    if stores := report.get("stores"):
        out += section(
            "One limit check in process (two limits: tokens and requests per minute), "
            f"{stores['requests']} requests per store and mode, concurrent: batches of "
            f"{stores['batch']} gathered; medians over {stores['rounds']} round(s); SQLite "
            f"{stores['sqlite']}, redis-server {stores['redis_server'] or '-'}, redis-py "
            f"{stores['redis_py']}{truncation(stores)}.",
            figures_table(
                ["store", "mode"],
                [
                    ([kind, mode], f)
                    for kind, modes in stores["stores"].items()
                    for mode, f in modes.items()
                ],
                STORE_COLUMNS,
            ),
        )
    if dispatch := report.get("dispatch"):
        out += section(
            "mitmproxy's dispatch of one flow's four events (requestheaders, request, "
            "responseheaders, response, each followed by `update`) through mitmdump's default "
            f"addons, alone and with {dispatch['addons']} no-op addons shaped like TokenGate's, "
            f"in this process: CPU µs per flow, medians of {dispatch['batches']} batches of "
            f"{dispatch['flows']} flows taking turns{truncation(dispatch)}.",
            figures_table(
                ["addons"],
                [([LABELS[n]], f) for n, f in dispatch["targets"].items()],
                DISPATCH_COLUMNS,
            ),
        )
    for name, profile in report.get("profiles", {}).items():
        out += section(
            f"Profile of {LABELS[name]} under load (py-spy: {profile['samples']} samples, "
            f"busy {cell(profile['busy_ms_per_request'], '{:.2f}')} ms per request, "
            f"{cell(profile['tokengate_share'], '{:.0%}')} of the samples in TokenGate's code; "
            "the sampling slows the proxy, so this run's other figures are not comparable).",
            table(
                ["function the samples land in", "share"],
                [[f"`{frame}`", f"{share:.1%}"] for frame, share in profile["top_functions"]],
            ),
        )
        if profile["top_tokengate_entries"]:
            out += [
                "",
                table(
                    ["through TokenGate's", "share"],
                    [
                        [f"`{frame}`", f"{share:.1%}"]
                        for frame, share in profile["top_tokengate_entries"]
                    ],
                ),
            ]
    if report["targets_met"]:
        verdict = {True: "yes", False: "**no**", None: "-"}
        out += section(
            "Targets:",
            table(
                ["target", "measured", "limit", "met"],
                [
                    [
                        row["target"],
                        cell(row["value"], "{:.2f}"),
                        f"{row['limit']:g}",
                        verdict[row["met"]],
                    ]
                    for row in report["targets_met"]
                ],
            ),
        )
    return "\n".join(out)


def section(caption: str, body: str) -> list[str]:
    return ["", caption, "", body]


def truncation(phase: dict) -> str:
    return ": **cut short by its time budget**" if phase.get("truncated") else ""


# --- command line ---------------------------------------------------------------------------


def names(allowed: Sequence[str]):
    def parse(text: str) -> list[str]:
        chosen = [name.strip() for name in text.split(",") if name.strip()]
        unknown = set(chosen) - set(allowed)
        if unknown or not chosen:
            raise ValueError(f"choose from {', '.join(allowed)}")
        return [name for name in allowed if name in chosen]

    parse.__name__ = "list"
    return parse


def levels(text: str) -> list[int]:
    values = [int(part) for part in text.split(",")]
    if not values or min(values) < 1 or max(values) > 256:
        raise ValueError("concurrency levels must be 1..256")
    return values


def parse_args(argv: list[str] | None = None):
    parser = benchkit.parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of fresh processes")
    parser.add_argument("--requests", type=int, default=400, help="requests per level")
    parser.add_argument("--concurrency", type=levels, default=[1, 8, 32], help="e.g. 1,8,32")
    parser.add_argument("--targets", type=names(TARGETS), default=list(TARGETS))
    parser.add_argument("--phases", type=names(PHASES), default=list(PHASES))
    parser.add_argument("--stream-requests", type=int, default=60, help="per target and round")
    parser.add_argument("--keys", type=int, default=10_000, help="keys in the keys phase")
    parser.add_argument("--store-requests", type=int, default=2000, help="per store and mode")
    parser.add_argument(
        "--dispatch-flows", type=int, default=300, help="flows per batch in the dispatch phase"
    )
    parser.add_argument(
        "--level-seconds", type=float, default=20.0, help="time cap per concurrency level"
    )
    parser.add_argument(
        "--phase-seconds", type=float, default=240.0, help="time budget of each phase"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tiny run (for the test): 1 round, few requests"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample each proxy with py-spy during the load phase (folded stacks into DIR); "
        "the sampling slows the proxies, so this run's figures are not comparable",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.requests, args.concurrency = 1, 12, [1, 2]
        args.stream_requests, args.keys, args.store_requests = 4, 30, 20
        args.dispatch_flows = 10
    counts = (args.rounds, args.requests, args.stream_requests, args.keys, args.store_requests)
    counts += (args.dispatch_flows,)
    if min(counts) < 1 or max(counts) > MAX_COUNT:
        parser.error(f"counts must be 1..{MAX_COUNT:,}")
    if args.level_seconds <= 0 or args.phase_seconds <= 0:
        parser.error("--level-seconds and --phase-seconds must be positive")
    if {"load", "stream"} & set(args.phases) and BASELINE not in args.targets:
        parser.error("the load and stream phases need the mitmdump target: ratios are to it")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    benchkit.stop_on_sigterm()
    try:
        report = run(args)
    except KeyboardInterrupt:
        print("bench: interrupted; the processes it started are stopped", file=sys.stderr)
        return 130
    benchkit.emit(report, markdown, args.json)
    return 0


def run(args) -> dict:
    """Every phase asked for, in order; the report."""
    began = time.monotonic()
    budgets = {phase: Budget(args.phase_seconds) for phase in args.phases}
    report: dict = {"environment": benchkit.environment(), "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="bench-tokengate-") as tmp:
        session = Session(Path(tmp))
        proxy_budgets = {p: b for p, b in budgets.items() if p in ("load", "stream")}
        if proxy_budgets:
            report.update(proxy_phases(session, args, proxy_budgets))
        if "estimate" in budgets:
            with budgets["estimate"].running():
                report["estimate"] = estimate_phase(args, budgets["estimate"])
        if "keys" in budgets:
            startups = {
                name: figures["startup_ms"]
                for name, figures in report.get("load", {}).get("targets", {}).items()
            }
            report["keys"] = keys_phase(session, args, budgets["keys"], startups)
        if "stores" in budgets:
            report["stores"] = stores_phase(session, args, budgets["stores"])
    if "dispatch" in budgets:
        report["dispatch"] = dispatch_phase(args, budgets["dispatch"])
    if args.profile:
        served = {
            name: sum(level["requests"] for level in target["levels"].values())
            for name, target in report.get("load", {}).get("targets", {}).items()
        }
        report["profiles"] = {
            name: benchprofile.summary(files, served.get(name, 0))
            for name in args.targets
            if (files := sorted(args.profile.glob(f"{name}-*.folded")))
        }
    report["targets_met"] = verdicts(report)
    report["seconds"] = round(time.monotonic() - began, 1)
    return report


if __name__ == "__main__":
    sys.exit(main())
