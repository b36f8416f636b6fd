"""Soak: many mixed requests through ONE mitmdump with TokenGate, then the books are checked.

Starts the mock provider and one mitmdump (default SQLite store, ledger on) on 127.0.0.1 and
sends a seeded mix with bounded concurrency: streamed and not; chat, embeddings and Responses;
valid keys with a large budget and keys with a small rolling one (so 429s happen); missing and
wrong keys (401); provider errors, cut streams, answers without or with unbelievable usage.

It reports the answers per status, mitmdump's resident memory (VmRSS) after warm-up and at the
end, and then checks the invariants, exiting 1 if one fails: no reservation left (every key's
usage endpoint shows 0 reserved), the ledger's tokens per key equal the tokens the mock
delivered to that key (its `delivered_by_tag`), and no addon error in mitmdump's log.

`--baseline` first sends the same requests through plain mitmdump, to tell the gate's memory
growth from mitmdump's own; `--memtrace FILE` names what mitmdump holds (scripts/bench/memtrace.py).

    .venv/bin/python -m scripts.bench.soak [--requests 20000] [--concurrency 16] [--baseline]
        [--memtrace FILE] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import secrets
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
from tokengate_core.keys import hash_key
from tokengate_core.tools.children import Child

from scripts.bench import benchkit

BIG_KEYS = ("big-1", "big-2", "big-3")  # proxy /soak: a budget no mix spends (per 10 s)
TIGHT_KEYS = ("tight-1", "tight-2")  # proxy /tight: 1500 tokens per 10 s, so 429s happen
MODES = (
    ("normal", 80),
    ("no-usage", 4),
    ("usage-negative", 2),
    ("usage-absurd", 2),
    ("invalid-json", 2),
    ("split", 2),
    ("cut", 3),
    ("error:500", 3),
    ("error:429", 2),
)
WARM_UP = 0.1  # share of the requests after which RSS is first read
RSS_SAMPLES = 10
LOG_ERRORS = re.compile(r"Traceback|Addon error|error in ")
REQUEST_TIMEOUT = 30.0
MEMTRACE = str(Path(__file__).with_name("memtrace.py"))


def write_quotas(path: Path, mock_url: str, keys: dict[str, str], store: str) -> Path:
    def entries(names) -> str:
        return "".join(f'      {n}: {{sha256: "{hash_key(keys[n])}"}}\n' for n in names)

    path.write_text(
        "providers:\n  mock:\n"
        f"    base_url: {mock_url}/v1\n    api_key_env: {benchkit.PROVIDER_ENV}\n"
        "proxies:\n"
        "  soak:\n    context: /soak\n    provider: mock\n"
        "    token_limits:\n      total_tokens:\n        - {count: 1000000000, duration: 10s}\n"
        "    keys:\n" + entries(BIG_KEYS) + "  tight:\n    context: /tight\n    provider: mock\n"
        "    token_limits:\n      total_tokens:\n        - {count: 1500, duration: 10s}\n"
        "    keys:\n" + entries(TIGHT_KEYS) + f"store:\n  kind: {store}\n",
        encoding="utf-8",
    )
    return path


@dataclass(frozen=True)
class Call:
    path: str
    body: dict
    headers: dict[str, str]
    stream: bool


def plan(rng: random.Random, keys: dict[str, str]) -> Call:
    """One request of the mix."""
    who = rng.choices(["big", "tight", "wrong", "none"], weights=[60, 25, 10, 5])[0]
    name = rng.choice(BIG_KEYS if who == "big" else TIGHT_KEYS)
    context = "/tight" if who == "tight" else "/soak"
    mode = rng.choices([m for m, _ in MODES], weights=[w for _, w in MODES])[0]
    headers = {"X-Mock-Mode": mode, "X-Mock-Tag": name if who in ("big", "tight") else "none"}
    if who in ("big", "tight"):
        headers["Authorization"] = f"Bearer {keys[name]}"
    elif who == "wrong":
        headers["Authorization"] = "Bearer tg-not-a-key-of-this-gate"
    endpoint = rng.choices(["chat/completions", "embeddings", "responses"], weights=[85, 10, 5])[0]
    stream = endpoint != "embeddings" and rng.random() < 0.4
    words = " ".join(
        rng.choice(("alpha", "beta", "gamma", "delta")) for _ in range(rng.randint(1, 30))
    )
    if endpoint == "embeddings":
        body: dict = {"model": "text-embedding-3-small", "input": words}
    elif endpoint == "responses":
        body = {"model": "gpt-4o", "input": words, "max_output_tokens": rng.randint(16, 40)}
    else:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": words}]}
        if rng.random() < 0.8:
            body["max_tokens"] = rng.randint(1, 40)
    if stream:
        body["stream"] = True
    return Call(f"{context}/{endpoint}", body, headers, stream)


async def send(client: httpx.AsyncClient, call: Call) -> str:
    """The outcome: the status, `gate` when the gate answered itself, `cut` for an answer that
    broke off."""
    try:
        async with client.stream("POST", call.path, json=call.body, headers=call.headers) as answer:
            label = str(answer.status_code)
            if answer.headers.get("X-TokenGate-Source") == "gateway":
                label += " gate"
            try:
                await answer.aread()
            except httpx.HTTPError:
                return f"{label} cut"
            return label
    except httpx.HTTPError as error:
        return f"no answer ({type(error).__name__})"


def rss_kib(pid: int) -> int | None:
    """Resident memory of a process (Linux /proc); None where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def drive(
    gate_url: str, pid: int, args: argparse.Namespace, keys: dict[str, str], prefix: str = ""
):
    """Send the seeded mix; with `prefix`, each path's proxy context is replaced by it."""
    rng = random.Random(args.seed)
    calls = [plan(rng, keys) for _ in range(args.requests)]
    if prefix:
        calls = [replace(c, path=prefix + c.path[c.path.index("/", 1) :]) for c in calls]
    outcomes: Counter[str] = Counter()
    samples: list[tuple[int, int | None]] = []  # (requests done, VmRSS KiB)
    every = max(1, args.requests // RSS_SAMPLES)
    warm = max(1, int(args.requests * WARM_UP))
    deadline = time.monotonic() + args.max_seconds
    next_call = iter(calls)
    done = 0
    limits = httpx.Limits(max_connections=args.concurrency)

    async with httpx.AsyncClient(
        base_url=gate_url, limits=limits, timeout=REQUEST_TIMEOUT, trust_env=False
    ) as client:

        async def worker() -> None:
            nonlocal done
            for call in next_call:
                if time.monotonic() > deadline:
                    return
                outcomes[await send(client, call)] += 1
                done += 1
                if done == warm or done % every == 0:
                    samples.append((done, rss_kib(pid)))

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    samples.append((done, rss_kib(pid)))
    return outcomes, samples, done


def http_json(url: str, headers: dict[str, str] | None = None) -> dict:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def reserved_left(gate_url: str, keys: dict[str, str], wait: float = 10.0) -> dict[str, int]:
    """Each key's reserved tokens, once they are all 0 or `wait` seconds have passed."""
    deadline = time.monotonic() + wait
    while True:
        left = {}
        for name in BIG_KEYS + TIGHT_KEYS:
            context = "/tight" if name in TIGHT_KEYS else "/soak"
            standing = http_json(f"{gate_url}{context}/tokengate/usage", {"X-API-Key": keys[name]})
            left[name] = sum(limit["reserved"] for limit in standing["limits"])
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def ledger_totals(folder: Path) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for path in folder.glob("ledger.jsonl*"):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("key"):
                totals[record["key"]] += record["total_tokens"]
    return dict(totals)


def memory(samples: list[tuple[int, int | None]], requests: int) -> dict:
    """VmRSS after warm-up and at the end, the growth, and the growth per request after warm-up."""
    warm_at, warm = next(
        ((count, kib) for count, kib in samples if count >= requests * WARM_UP), (None, None)
    )
    end_at, end = samples[-1] if samples else (None, None)
    growth = None if warm is None or end is None else end - warm
    return {
        "rss_kib_after_warm_up": warm,
        "rss_kib_at_end": end,
        "rss_growth_kib": growth,
        "rss_bytes_per_request": None
        if growth is None or end_at == warm_at
        else round(growth * 1024 / (end_at - warm_at)),
        "rss_samples": samples,
    }


def trace_args(args: argparse.Namespace, out: Path | None) -> list[str]:
    """The arguments that load scripts/bench/memtrace.py into mitmdump, writing to `out`."""
    if out is None:
        return []
    warm = str(max(1, int(args.requests * WARM_UP)))
    return ["-s", MEMTRACE, "--set", f"memtrace_out={out}", "--set", f"memtrace_warm_flows={warm}"]


def baseline(args: argparse.Namespace, keys: dict[str, str], deadline: float) -> dict:
    """The same requests through plain mitmdump (no addon) to the mock under /v1: the memory a
    mitmdump needs for this traffic without TokenGate. Nothing is refused, so every request
    reaches the mock."""
    children: list[Child] = []
    try:
        mock = Child([*benchkit.MOCK, "--completion-tokens", "30", "--stream-delay", "0.001"])
        children.append(mock)
        mock_url = benchkit.url_of(mock, deadline)
        out = None if args.memtrace is None else args.memtrace.with_suffix(".baseline.txt")
        plain = benchkit.mitmdump(mock_url, *trace_args(args, out))
        children.append(plain)
        plain_url = benchkit.url_of(plain, deadline)
        outcomes, samples, done = asyncio.run(
            drive(plain_url, plain.popen.pid, args, keys, prefix="/v1")
        )
    finally:
        for child in reversed(children):
            child.stop()
    return {"requests": done, "outcomes": dict(sorted(outcomes.items())), **memory(samples, done)}


def run(args: argparse.Namespace) -> dict:
    began = time.monotonic()
    keys = {name: "tg-" + secrets.token_urlsafe(24) for name in BIG_KEYS + TIGHT_KEYS}
    plain = baseline(args, keys, began + 60) if args.baseline else None
    provider_key = "sk-soak-" + secrets.token_hex(8)
    children: list[Child] = []
    with tempfile.TemporaryDirectory(prefix="tokengate-soak-") as folder:
        try:
            mock = benchkit.mock(
                provider_key, "--completion-tokens", "30", "--stream-delay", "0.001"
            )
            children.append(mock)
            mock_url = benchkit.url_of(mock, time.monotonic() + 60)
            config = write_quotas(Path(folder) / "quotas.yaml", mock_url, keys, args.store)
            tracing = trace_args(args, args.memtrace)
            gate = benchkit.gateway(mock_url, config, provider_key, *tracing)
            children.append(gate)
            gate_url = benchkit.url_of(gate, time.monotonic() + 60)
            outcomes, samples, done = asyncio.run(drive(gate_url, gate.popen.pid, args, keys))
            left = reserved_left(gate_url, keys)
            delivered = http_json(f"{mock_url}/mock/stats")["delivered_by_tag"]
            log_errors = [line for line in gate.lines if LOG_ERRORS.search(line)]
        finally:
            for child in reversed(children):
                child.stop()  # mitmdump first: its ledger is written out on the way down
        ledger = ledger_totals(Path(folder) / ".state")
    charged = {name: ledger.get(name, 0) for name in BIG_KEYS + TIGHT_KEYS}
    served = {name: delivered.get(name, 0) for name in BIG_KEYS + TIGHT_KEYS}
    failures = []
    if any(left.values()):
        failures.append(f"reservations left: {left}")
    if charged != served:
        failures.append(f"ledger {charged} != mock delivered {served}")
    if log_errors:
        failures.append(f"{len(log_errors)} error lines in mitmdump's log: {log_errors[:3]}")
    if done < args.requests:
        failures.append(f"only {done} of {args.requests} requests within --max-seconds")
    return {
        "requests": done,
        "concurrency": args.concurrency,
        "seed": args.seed,
        "store": args.store,
        "seconds": round(time.monotonic() - began, 1),
        "outcomes": dict(sorted(outcomes.items())),
        **memory(samples, done),
        "baseline": plain,
        "reserved_left": left,
        "ledger_tokens": charged,
        "mock_delivered_tokens": served,
        "failures": failures,
    }


def rss_line(figures: dict) -> str:
    if figures["rss_growth_kib"] is None:
        return "VmRSS: not readable here"
    return (
        f"VmRSS: {figures['rss_kib_after_warm_up']} KiB after warm-up, "
        f"{figures['rss_kib_at_end']} KiB at the end ({figures['rss_growth_kib']:+d} KiB, "
        f"{figures['rss_bytes_per_request']} bytes per request after warm-up)"
    )


def text(report: dict) -> str:
    lines = [
        *([f"plain mitmdump {rss_line(report['baseline'])}"] if report["baseline"] else []),
        f"{report['requests']} requests, concurrency {report['concurrency']}, seed "
        f"{report['seed']}, {report['store']} store, {report['seconds']} s",
        "answers: " + ", ".join(f"{k}: {v}" for k, v in report["outcomes"].items()),
        f"TokenGate mitmdump {rss_line(report)}",
        f"reserved left: {sum(report['reserved_left'].values())}",
        f"ledger tokens per key:   {report['ledger_tokens']}",
        f"mock delivered per key:  {report['mock_delivered_tokens']}",
    ]
    lines += [f"FAILED: {failure}" for failure in report["failures"]] or ["invariants: all hold"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--store", choices=("sqlite", "memory"), default="sqlite")
    parser.add_argument(
        "--max-seconds", type=float, default=1800.0, help="overall budget for sending requests"
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="first send the same requests through plain mitmdump and report its memory too",
    )
    parser.add_argument(
        "--memtrace",
        type=Path,
        help="load scripts/bench/memtrace.py into mitmdump, writing its report to this file"
        " (and the baseline's beside it); slows mitmdump several times",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 1_000_000 or not 1 <= args.concurrency <= 256:
        parser.error("--requests must be 1..1000000 and --concurrency 1..256")
    if args.max_seconds <= 0:
        parser.error("--max-seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(json.dumps(report, indent=2) if args.json else text(report))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
