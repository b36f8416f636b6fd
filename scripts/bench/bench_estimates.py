"""Bursts against providers that count prompts otherwise than the gate's tokenizer, cold and warm.

Starts the mock provider and a mitmdump with TokenGate (SQLite store) on 127.0.0.1. Each prompt
rule is a provider of its own (the same mock, told the rule by `X-Mock-Prompt-Rule`): 10 % above
the tokenizer (`scale:1.10`), 10 % below (`scale:0.90`), and a token per two characters of the
prompt's text (`chars:2`, another rule altogether). The model, `llama-3.1-8b`, is not in
tiktoken's table, as on a local server: cold, the gate reserves with its margin. For each rule:

- cold: N concurrent chat requests with `max_tokens` on a fresh key of L total tokens/min,
  before the gate has seen an answer from that provider;
- warm-up: W requests, one at a time, on a roomy key;
- warm: N concurrent requests on another fresh key.

Prompts are lorem ipsum words of random length (seeded), so the ratio of the provider's count to
the estimate varies by request under the `chars` rule. Reported: admitted, 429s, what the
provider served (the mock's `tokens_served`), the overshoot (served - L), the utilisation
(served / L), and the factor the gate learned.

    .venv/bin/python -m scripts.bench.bench_estimates [--requests 50] [--limit 5000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import secrets
import sqlite3
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from tokengate_core.estimates import DEFAULT_MARGIN, DEFAULT_WARMUP, Record, key_of
from tokengate_core.keys import hash_key
from tokengate_core.tools.mock import LOREM

from scripts.bench import benchkit
from scripts.bench.bench_burst import REQUEST_TIMEOUT, burst_parser, check_burst, mock_call
from scripts.bench.benchkit import PROVIDER_ENV, OutOfTime, started, url_of

RULES = {"over": "scale:1.10", "under": "scale:0.90", "chars": "chars:2"}
MODEL = "llama-3.1-8b"
MAX_TOKENS = 50
WORDS = LOREM.split()
PHASES = ("cold", "warm")


@dataclass
class Outcome:
    provider: str
    rule: str
    phase: str
    admitted: int
    refused: int
    served: int  # tokens the provider billed (mock's tokens_served)
    overshoot: int  # served - limit
    utilisation: float  # served / limit
    factor: float | None  # what the gate had learned by the end (warm rows)


def keys_for(rule: str) -> dict[str, str]:
    return {part: f"tg-{part}-{rule}-{secrets.token_hex(8)}" for part in ("roomy", *PHASES)}


def write_quotas(path: Path, mock_url: str, limit: int, keys: dict[str, dict[str, str]]) -> Path:
    """Per rule a provider and two proxies: `<rule>-roomy` (warm-up) and `<rule>` (bursts,
    each phase its own key of `limit`)."""
    text = "providers:\n"
    for rule in RULES:
        text += (
            f"  {rule}:\n    base_url: {mock_url}/v1\n    api_key_env: {PROVIDER_ENV}\n"
            "    hosts: [127.0.0.1]\n"
        )
    text += "proxies:\n"
    for rule, secrets_ in keys.items():
        for name, count, parts in ((f"{rule}-roomy", 10**9, ("roomy",)), (rule, limit, PHASES)):
            text += (
                f"  {name}:\n    context: /{name}\n    provider: {rule}\n"
                f"    token_limits:\n      total_tokens:\n        - {{count: {count}, "
                "duration: 1m}\n    keys:\n"
            )
            for part in parts:
                text += f'      {part}: {{sha256: "{hash_key(secrets_[part])}"}}\n'
    path.write_text(text, encoding="utf-8")
    return path


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 160)))


async def one_request(
    client: httpx.AsyncClient, path: str, key: str, rule: str, text: str, delay: float
) -> bool:
    """Whether the request was admitted (200) rather than refused (429)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    body["max_tokens"] = MAX_TOKENS
    headers = {"Authorization": f"Bearer {key}", "X-Mock-Prompt-Rule": rule}
    if delay:  # the mock takes this long per answer, so that a burst is in flight at once
        headers.update({"X-Mock-Mode": "slow", "X-Mock-Delay": str(delay)})
    answer = await client.post(f"{path}/chat/completions", json=body, headers=headers)
    if answer.status_code not in (200, 429):
        raise RuntimeError(f"{path}: HTTP {answer.status_code}: {answer.text[:300]}")
    return answer.status_code == 200


async def burst(gate_url: str, mock_url: str, rule: str, key: str, args, rng) -> tuple[int, int]:
    """(admitted, tokens served) of one burst of concurrent requests."""
    mock_call(mock_url, "POST", "/mock/reset")
    limits = httpx.Limits(max_connections=args.requests)
    async with httpx.AsyncClient(
        base_url=gate_url, limits=limits, timeout=REQUEST_TIMEOUT, trust_env=False
    ) as client:
        texts = [prompt(rng) for _ in range(args.requests)]
        admitted = await asyncio.gather(
            *(
                one_request(client, f"/{rule}", key, RULES[rule], text, args.provider_seconds)
                for text in texts
            )
        )
    served = mock_call(mock_url, "GET", "/mock/stats")["tokens_served"]["total"]
    return sum(admitted), served


async def warm_up(gate_url: str, rule: str, key: str, count: int, rng) -> None:
    async with httpx.AsyncClient(
        base_url=gate_url, timeout=REQUEST_TIMEOUT, trust_env=False
    ) as client:
        for _ in range(count):
            if not await one_request(client, f"/{rule}-roomy", key, RULES[rule], prompt(rng), 0):
                raise RuntimeError("a warm-up request was refused")


def learned(store: Path, rule: str) -> float | None:
    with contextlib.closing(sqlite3.connect(store)) as db:
        row = db.execute(
            "SELECT record FROM learned WHERE key = ?", (key_of(rule, MODEL),)
        ).fetchone()
    record = Record.parse(row[0]) if row else None
    return round(record.bound, 4) if record else None


async def measure(gate_url: str, mock_url: str, store: Path, args, deadline: float) -> list:
    rng = random.Random(args.seed)
    outcomes = []
    for rule, keys in args.keys.items():
        for phase in PHASES:
            if time.monotonic() >= deadline:
                raise OutOfTime
            if phase == "warm":
                await warm_up(gate_url, rule, keys["roomy"], args.warmup, rng)
                await asyncio.sleep(1.5)  # the answers reach the store (read for the report)
            admitted, served = await burst(gate_url, mock_url, rule, keys[phase], args, rng)
            outcomes.append(
                Outcome(
                    provider=rule,
                    rule=RULES[rule],
                    phase=phase,
                    admitted=admitted,
                    refused=args.requests - admitted,
                    served=served,
                    overshoot=served - args.limit,
                    utilisation=round(served / args.limit, 3),
                    factor=learned(store, rule) if phase == "warm" else None,
                )
            )
    return outcomes


def run(args: argparse.Namespace) -> dict:
    began = time.monotonic()
    deadline = began + args.max_seconds
    provider_key = "sk-bench-" + secrets.token_hex(16)
    args.keys = {rule: keys_for(rule) for rule in RULES}
    outcomes: list[Outcome] = []
    truncated = False
    try:
        with (
            tempfile.TemporaryDirectory(prefix="bench-estimates-") as tmp,
            contextlib.ExitStack() as stack,
        ):
            mock = benchkit.mock(provider_key, "--completion-tokens", str(MAX_TOKENS))
            mock_url = url_of(started(stack, mock), deadline)
            config = write_quotas(Path(tmp) / "quotas.yaml", mock_url, args.limit, args.keys)
            gate = started(stack, benchkit.gateway(mock_url, config, provider_key))
            gate_url = url_of(gate, deadline)
            store = Path(tmp) / ".state" / "tokengate.sqlite3"
            try:
                outcomes = asyncio.run(measure(gate_url, mock_url, store, args, deadline))
            except OutOfTime:
                truncated = True
    except OutOfTime:
        truncated = True
    return {
        "requests": args.requests,
        "limit": args.limit,
        "max_tokens": MAX_TOKENS,
        "warmup": args.warmup,
        "model": MODEL,
        "margin": DEFAULT_MARGIN,
        "truncated": truncated,
        "seconds": round(time.monotonic() - began, 1),
        "scenarios": [asdict(outcome) for outcome in outcomes],
    }


COLUMNS: tuple[benchkit.Column, ...] = (
    ("admitted", "admitted", "{:d}"),
    ("429", "refused", "{:d}"),
    ("served upstream", "served", "{:d}"),
    ("overshoot", "overshoot", "{:+d}"),
    ("utilisation", "utilisation", "{:.0%}"),
    ("learned factor", "factor", "{:.3f}"),
)


def markdown(report: dict) -> str:
    rows = [([row["rule"], row["phase"]], row) for row in report["scenarios"]]
    return "\n".join(
        [
            f"{report['requests']} concurrent chat requests of 60-160 lorem words with max_tokens "
            f"{report['max_tokens']} ({report['model']}, cold margin {report['margin']}) against "
            f"a fresh key of L = {report['limit']} total tokens/min; warm after "
            f"{report['warmup']} answers"
            + (": stopped early by --max-seconds." if report["truncated"] else "."),
            "",
            benchkit.figures_table(["provider counts", "phase"], rows, COLUMNS),
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = burst_parser(__doc__, 5000)
    parser.add_argument(
        "--warmup",
        type=int,
        default=2 * DEFAULT_WARMUP,
        help="answers seen, one at a time, before the warm burst",
    )
    parser.add_argument("--seed", type=int, default=7, help="of the prompts' random words")
    args = parser.parse_args(argv)
    check_burst(parser, args)
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    benchkit.stop_on_sigterm()
    benchkit.emit(run(args), markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
