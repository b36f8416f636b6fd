"""Bursts against a small budget: how much a gateway lets through, and how much of it is used.

Starts the mock provider and a mitmdump with TokenGate on 127.0.0.1, then, for each scenario,
sends N concurrent chat requests (about 60 tokens each) with a fresh caller key whose budget is
L total tokens per minute: with and without `max_tokens`, streamed and not, with `queue_wait` off
and on. It prints what was admitted, what the provider served (the mock's `tokens_served`), what
the gate settled (`X-Tokens-Consumed`, or the stream's trailer comment), the overshoot
(served - L) and the utilisation (served / L).

    .venv/bin/python -m scripts.bench.bench_burst [--requests 50] [--limit 1000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import secrets
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from tokengate_core.keys import hash_key

from scripts.bench import benchkit
from scripts.bench.benchkit import PROVIDER_ENV, OutOfTime, started, url_of

PROMPT = [{"role": "user", "content": "Hello!"}]  # 9 tokens for gpt-4o-mini
COMPLETION = 50  # what each request generates: 9 + 50 = 59 tokens
QUEUE_WAIT = "10s"
REQUEST_TIMEOUT = 30.0
TRAILER_CONSUMED = re.compile(rb"^: .*x-tokens-consumed=(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Scenario:
    max_tokens: bool
    stream: bool
    queue: bool

    @property
    def key_name(self) -> str:
        return f"m{int(self.max_tokens)}s{int(self.stream)}q{int(self.queue)}"


SCENARIOS = tuple(Scenario(*flags) for flags in itertools.product((True, False), repeat=3))


@dataclass
class Outcome:
    max_tokens: bool
    stream: bool
    queue_wait: bool
    admitted: int
    refused: int
    served: int  # tokens the provider generated and billed (mock's tokens_served)
    settled: int  # what the gate charged, summed over the admitted requests
    overshoot: int  # served - limit
    utilisation: float  # served / limit


def write_quotas(path: Path, mock_url: str, limit: int, keys: dict[Scenario, str]) -> Path:
    """Two proxies (queue_wait off and on), one fresh key per scenario, each its own budget."""
    text = (
        "providers:\n  mock:\n"
        f"    base_url: {mock_url}/v1\n    api_key_env: {PROVIDER_ENV}\n"
        "    hosts: [127.0.0.1]\nproxies:\n"
    )
    for queue in (False, True):
        text += (
            f"  {'queued' if queue else 'plain'}:\n"
            f"    context: /{'queued' if queue else 'plain'}\n    provider: mock\n"
            f"    token_limits:\n      total_tokens:\n        - {{count: {limit}, duration: 1m}}\n"
            + (f"    queue_wait: {QUEUE_WAIT}\n" if queue else "")
            + "    keys:\n"
        )
        for scenario, secret in keys.items():
            if scenario.queue == queue:
                text += f'      {scenario.key_name}: {{sha256: "{hash_key(secret)}"}}\n'
    path.write_text(text, encoding="utf-8")
    return path


async def one_request(
    client: httpx.AsyncClient, scenario: Scenario, key: str, provider_seconds: float
) -> int | None:
    """What the gate settled for one request, or None when it was refused (429)."""
    body: dict = {"model": "gpt-4o-mini", "messages": PROMPT}
    if scenario.max_tokens:
        body["max_tokens"] = COMPLETION
    if scenario.stream:
        body["stream"] = True
    # The mock takes `provider_seconds` per answer (spread over a stream's events), so the
    # burst's requests are in flight together, as with a real model.
    delay = provider_seconds / 10 if scenario.stream else provider_seconds
    headers = {
        "Authorization": f"Bearer {key}",
        "X-Mock-Mode": "slow",
        "X-Mock-Delay": str(delay),
    }
    path = f"/{'queued' if scenario.queue else 'plain'}/chat/completions"
    async with client.stream("POST", path, json=body, headers=headers) as answer:
        payload = await answer.aread()
    if answer.status_code == 429:
        return None
    if answer.status_code != 200:
        raise RuntimeError(f"{path}: HTTP {answer.status_code}: {payload[:300]!r}")
    if scenario.stream:
        found = TRAILER_CONSUMED.search(payload)
        if found is None:
            raise RuntimeError("a stream ended without TokenGate's trailer comment")
        return int(found.group(1))
    return int(answer.headers["X-Tokens-Consumed"])


def mock_call(mock_url: str, method: str, path: str) -> dict:
    request = urllib.request.Request(mock_url + path, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"{}")


async def burst(
    gate_url: str,
    mock_url: str,
    scenario: Scenario,
    key: str,
    args: argparse.Namespace,
    deadline: float,
) -> Outcome:
    mock_call(mock_url, "POST", "/mock/reset")
    limits = httpx.Limits(max_connections=args.requests)
    async with httpx.AsyncClient(
        base_url=gate_url, limits=limits, timeout=REQUEST_TIMEOUT, trust_env=False
    ) as client:
        tasks = [
            one_request(client, scenario, key, args.provider_seconds) for _ in range(args.requests)
        ]
        try:
            settled = await asyncio.wait_for(
                asyncio.gather(*tasks), max(0.1, deadline - time.monotonic())
            )
        except TimeoutError:
            raise OutOfTime from None
    served = mock_call(mock_url, "GET", "/mock/stats")["tokens_served"]["total"]
    admitted = [figure for figure in settled if figure is not None]
    return Outcome(
        max_tokens=scenario.max_tokens,
        stream=scenario.stream,
        queue_wait=scenario.queue,
        admitted=len(admitted),
        refused=len(settled) - len(admitted),
        served=served,
        settled=sum(admitted),
        overshoot=served - args.limit,
        utilisation=round(served / args.limit, 3),
    )


def run(args: argparse.Namespace) -> dict:
    began = time.monotonic()
    deadline = began + args.max_seconds
    provider_key = "sk-bench-" + secrets.token_hex(16)
    keys = {scenario: "tg-bench-" + secrets.token_hex(16) for scenario in SCENARIOS}
    outcomes: list[Outcome] = []
    truncated = False
    try:
        with (
            tempfile.TemporaryDirectory(prefix="bench-burst-") as tmp,
            contextlib.ExitStack() as stack,
        ):
            mock = benchkit.mock(provider_key, "--completion-tokens", str(COMPLETION))
            mock_url = url_of(started(stack, mock), deadline)
            config = write_quotas(Path(tmp) / "quotas.yaml", mock_url, args.limit, keys)
            gate = started(stack, benchkit.gateway(mock_url, config, provider_key))
            gate_url = url_of(gate, deadline)
            for scenario in SCENARIOS:
                outcome = burst(gate_url, mock_url, scenario, keys[scenario], args, deadline)
                outcomes.append(asyncio.run(outcome))
    except OutOfTime:
        truncated = True
    return {
        "requests": args.requests,
        "limit": args.limit,
        "completion": COMPLETION,
        "queue_wait": QUEUE_WAIT,
        "truncated": truncated,
        "seconds": round(time.monotonic() - began, 1),
        "scenarios": [asdict(outcome) for outcome in outcomes],
    }


FLAGS = ("max_tokens", "stream", "queue_wait")
COLUMNS: tuple[benchkit.Column, ...] = (
    ("admitted", "admitted", "{:d}"),
    ("429", "refused", "{:d}"),
    ("served upstream", "served", "{:d}"),
    ("settled by gate", "settled", "{:d}"),
    ("overshoot", "overshoot", "{:+d}"),
    ("utilisation", "utilisation", "{:.0%}"),
)


def markdown(report: dict) -> str:
    rows = [(["yes" if row[flag] else "no" for flag in FLAGS], row) for row in report["scenarios"]]
    return "\n".join(
        [
            f"{report['requests']} concurrent chat requests of ~{9 + report['completion']} tokens "
            f"against a fresh key of L = {report['limit']} total tokens/min; queue_wait "
            f"{report['queue_wait']} where on"
            + (": stopped early by --max-seconds." if report["truncated"] else "."),
            "",
            benchkit.figures_table(["max_tokens", "streamed", "queue_wait"], rows, COLUMNS),
        ]
    )


def burst_parser(doc: str | None, default_limit: int) -> argparse.ArgumentParser:
    """The options every burst bench takes (this one's, and the estimates bench's)."""
    parser = benchkit.parser(doc)
    parser.add_argument("--requests", type=int, default=50, help="concurrent requests per burst")
    parser.add_argument(
        "--limit", type=int, default=default_limit, help="total tokens per minute (L)"
    )
    parser.add_argument(
        "--provider-seconds",
        type=float,
        default=0.3,
        help="how long the mock takes per answer, so that a burst is in flight at once",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=120.0, help="overall budget; past it the run stops"
    )
    return parser


def check_burst(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.requests < 1 or args.requests > 200 or args.limit < 1:
        parser.error("--requests must be 1..200 and --limit at least 1")
    if args.provider_seconds < 0 or args.max_seconds <= 0:
        parser.error("--provider-seconds must not be negative, --max-seconds must be positive")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = burst_parser(__doc__, 1000)
    args = parser.parse_args(argv)
    check_burst(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    benchkit.stop_on_sigterm()
    benchkit.emit(run(args), markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
