"""What TokenGate costs per request: latency and throughput against a plain mitmdump.

Starts the mock provider, a plain reverse-mode mitmdump in front of it and a mitmdump with
TokenGate, and sends the same small chat request to each. The plain mitmdump is the baseline, so
the ratios show what the addon adds, not what mitmproxy costs. Targets take turns in blocks so
machine noise hits them alike; each round starts fresh mitmdumps (which also times their
startup), and every figure is the median over rounds. Everything stays on 127.0.0.1.

    .venv/bin/python -m scripts.bench_latency [--requests 300] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import httpx
from tokengate_core.keys import hash_key

from scripts.children import ROOT, Child

MITMDUMP = shutil.which("mitmdump", path=str(Path(sys.executable).parent)) or "mitmdump"
BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Hello!"}],
    "max_tokens": 5,
}
TARGETS = ("direct", "mitmdump", "tokengate")
LABELS = {"direct": "direct (mock)", "mitmdump": "plain mitmdump", "tokengate": "TokenGate"}
BASELINE = "mitmdump"
BLOCK = 50  # requests to one target before the next takes its turn
WARMUP = 5  # untimed requests per target and round: connection set-up, first-call caches
STARTUP_TIMEOUT = 30.0
REQUEST_TIMEOUT = 10.0
CONTEXT = "/bench"
PROVIDER_ENV = "TOKENGATE_BENCH_PROVIDER_KEY"
MOCK = [sys.executable, "scripts/mock_openai.py", "--port", "0", "--quiet"]


class OutOfTime(Exception):
    """The overall budget ran out: stop measuring and report what was collected."""


def url_of(child: Child, deadline: float) -> str:
    """The child's base URL once it listens; OutOfTime if the budget ends first."""
    match = child.wait_ready(max(0.0, min(STARTUP_TIMEOUT, deadline - time.monotonic())))
    if match is not None:
        return f"http://127.0.0.1:{match.group(1)}"
    if time.monotonic() >= deadline:
        raise OutOfTime
    raise RuntimeError(f"{child.popen.args[0]} did not start:\n{''.join(child.lines[-40:])}")


@dataclass
class Round:
    """One round's measurements; a round cut short by the budget is still reported."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {t: [] for t in TARGETS})
    startup: dict[str, float] = field(default_factory=dict)


def write_quotas(path: Path, mock_url: str, caller_key: str) -> Path:
    """A quotas file whose one proxy never limits: the benchmark measures overhead, not 429s."""
    path.write_text(
        "providers:\n"
        "  mock:\n"
        f"    base_url: {mock_url}/v1\n"
        f"    api_key_env: {PROVIDER_ENV}\n"
        "    hosts: [127.0.0.1]\n"
        "proxies:\n"
        "  bench:\n"
        "    version: v1.0\n"
        f"    context: {CONTEXT}\n"
        "    provider: mock\n"
        "    scope: key\n"
        "    token_limits:\n"
        "      total_tokens:\n"
        "        - {count: 1000000000000, duration: 1m}\n"
        "    keys:\n"
        f'      bench: {{sha256: "{hash_key(caller_key)}"}}\n',
        encoding="utf-8",
    )
    return path


def mitmdump(mock_url: str, *args: str, env: dict[str, str] | None = None) -> Child:
    argv = [MITMDUMP, "--listen-host", "127.0.0.1", "-p", "0", "--mode", f"reverse:{mock_url}"]
    return Child([*argv, "--set", "flow_detail=0", *args], env)


def run_round(
    mock_url: str, provider_key: str, caller_key: str, config: Path, n: int, deadline: float
) -> Round:
    """Fresh mitmdumps, then `n` timed requests per target in alternating blocks.

    Raises OutOfTime with the partial round in its first argument.
    """
    result = Round()
    children: dict[str, Child] = {}
    try:
        # One after the other, so neither startup competes with the other for the CPU.
        children["mitmdump"] = mitmdump(mock_url)
        plain_url = url_of(children["mitmdump"], deadline)
        gated_env = {**os.environ, PROVIDER_ENV: provider_key}
        children["tokengate"] = mitmdump(
            mock_url,
            "-s", str(ROOT / "addons" / "tokengate.py"),
            "--set", f"tokengate_config={config}",
            env=gated_env,
        )  # fmt: skip
        gated_url = url_of(children["tokengate"], deadline)
        result.startup = {name: child.startup for name, child in children.items()}

        routes = {
            "direct": (mock_url, "/v1/chat/completions", provider_key),
            "mitmdump": (plain_url, "/v1/chat/completions", provider_key),
            "tokengate": (gated_url, f"{CONTEXT}/chat/completions", caller_key),
        }
        clients = {
            name: httpx.Client(
                base_url=base,
                headers={"Authorization": f"Bearer {key}"},
                timeout=REQUEST_TIMEOUT,
                trust_env=False,  # a proxy from the environment would be measured too
            )
            for name, (base, _, key) in routes.items()
        }
        try:
            for name, client in clients.items():
                for _ in range(WARMUP):
                    send(client, routes[name][1], gated=name == "tokengate")
            for block, start in enumerate(range(0, n, BLOCK)):
                for turn in range(len(TARGETS)):
                    name = TARGETS[(block + turn) % len(TARGETS)]  # rotate who goes first
                    for _ in range(min(BLOCK, n - start)):
                        if time.monotonic() >= deadline:
                            raise OutOfTime
                        began = time.perf_counter()
                        send(clients[name], routes[name][1], gated=name == "tokengate")
                        result.latencies[name].append(time.perf_counter() - began)
        finally:
            for client in clients.values():
                client.close()
    except OutOfTime:
        raise OutOfTime(result) from None
    finally:
        for child in children.values():
            child.stop()
    return result


def send(client: httpx.Client, path: str, gated: bool) -> None:
    """One request; an error or an ungated answer would make the figures meaningless."""
    response = client.post(path, json=BODY)
    if response.status_code != 200:
        raise RuntimeError(f"{client.base_url}{path}: HTTP {response.status_code}: {response.text}")
    if gated and "X-Tokens-Consumed" not in response.headers:
        raise RuntimeError("TokenGate did not meter the request: is the addon loaded?")


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: with few samples it stays a measured value rather than an interpolation."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def summarize(rounds: list[Round]) -> dict[str, dict[str, float | int | None]]:
    """Figures per round, ratios against the same round's plain mitmdump, medians over rounds."""
    per_round: dict[str, list[dict[str, float]]] = {t: [] for t in TARGETS}
    for one in rounds:
        figures = {
            name: {
                "p50_ms": percentile(lat, 50) * 1000,
                "p99_ms": percentile(lat, 99) * 1000,
                "rps": len(lat) / sum(lat),
            }
            for name, lat in one.latencies.items()
            if lat
        }
        base = figures.get(BASELINE)
        for name, fig in figures.items():
            if base:
                fig["latency_ratio"] = fig["p50_ms"] / base["p50_ms"]
                fig["throughput_ratio"] = fig["rps"] / base["rps"]
                fig["added_p50_ms"] = fig["p50_ms"] - base["p50_ms"]
            if name in one.startup:
                fig["startup_ms"] = one.startup[name] * 1000
            per_round[name].append(fig)

    keys = ("startup_ms", "p50_ms", "p99_ms", "rps")
    keys += ("latency_ratio", "throughput_ratio", "added_p50_ms")
    summary: dict[str, dict[str, float | int | None]] = {}
    for name in TARGETS:
        summary[name] = {"samples": sum(len(one.latencies[name]) for one in rounds)}
        for key in keys:
            values = [fig[key] for fig in per_round[name] if key in fig]
            summary[name][key] = round(statistics.median(values), 3) if values else None
    return summary


def markdown(report: dict) -> str:
    """A table ready to paste into the README, with the conditions it was measured under."""
    columns = (  # header, field, decimals, suffix
        ("startup ms", "startup_ms", 0, ""),
        ("p50 ms", "p50_ms", 2, ""),
        ("p99 ms", "p99_ms", 2, ""),
        ("req/s", "rps", 0, ""),
        ("p50 vs mitmdump", "latency_ratio", 2, "x"),
        ("req/s vs mitmdump", "throughput_ratio", 2, "x"),
        ("added p50 ms", "added_p50_ms", 2, ""),
    )
    lines = [
        f"Medians over {report['rounds']} round(s) of {report['requests']} sequential keep-alive "
        f"requests per target (non-streamed chat, max_tokens 5); mitmproxy "
        f"{report['mitmproxy']}, {report['cpus']} CPU(s)"
        + (": stopped early by --max-seconds." if report["truncated"] else "."),
        "",
        "| target | samples | " + " | ".join(header for header, *_ in columns) + " |",
        "|---|" + "--:|" * (len(columns) + 1),
    ]
    for name, fig in report["targets"].items():
        cells = [LABELS[name], str(fig["samples"])]
        for _, key, digits, suffix in columns:
            value = fig[key]
            cells.append("-" if value is None else f"{value:.{digits}f}{suffix}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="timed requests per target")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each with new mitmdumps")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        help="overall budget; past it the run stops and reports what it has",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object, not Markdown")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.rounds < 1 or args.max_seconds <= 0:
        parser.error("--requests and --rounds must be at least 1, --max-seconds positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    deadline = began + args.max_seconds
    provider_key = "sk-bench-" + secrets.token_hex(16)
    caller_key = "tg-bench-" + secrets.token_hex(16)
    rounds: list[Round] = []
    truncated = False
    mock = Child([*MOCK, "--expect-key", provider_key])
    try:
        with tempfile.TemporaryDirectory(prefix="bench-tokengate-") as tmp:
            mock_url = url_of(mock, deadline)
            config = write_quotas(Path(tmp) / "quotas.yaml", mock_url, caller_key)
            keys = (provider_key, caller_key)
            for _ in range(args.rounds):
                try:
                    rounds.append(run_round(mock_url, *keys, config, args.requests, deadline))
                except OutOfTime as stop:
                    truncated = True
                    rounds.extend(stop.args)
                    break
    except OutOfTime:
        truncated = True
    finally:
        mock.stop()

    report = {
        "requests": args.requests,
        "rounds": sum(1 for one in rounds if any(one.latencies.values())),
        "truncated": truncated,
        "seconds": round(time.monotonic() - began, 1),
        "mitmproxy": version("mitmproxy"),
        "cpus": os.cpu_count(),
        "targets": summarize(rounds),
    }
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
