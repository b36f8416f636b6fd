"""Estimates that learn, end to end: a real mitmdump in front of the mock counting prompts 10 %
above the gate's tokenizer. After a warm-up, a burst with max_tokens does not overshoot its
budget and uses at least 90 % of it (the cold margin alone would use less); a restart on the same
SQLite store keeps what was learned."""

from __future__ import annotations

import asyncio
import sqlite3

import httpx
from tokengate_core.estimates import Record, key_of
from tokengate_core.tools.mock import LOREM

from tests.support.processes import Gateway, write_quotas
from tests.support.quotas import key_entries

MODEL = "llama-3.1-8b"  # unknown to tiktoken: cold, it is reserved with the margin
RULE = "scale:1.1"
LIMIT = 1000
BURST = 20
PROMPT = {"role": "user", "content": LOREM[:400]}  # 85 tokens here, 94 at the mock
MAX_TOKENS = 10
KEYS = {"warm": "tg-warm-up-key", "first": "tg-first-burst", "again": "tg-after-restart"}


def quotas() -> str:
    """`warm` teaches the gate with a roomy budget; each burst gets a fresh key of LIMIT."""
    return (
        "  warm:\n    context: /warm\n    provider: mock\n"
        "    token_limits:\n      total_tokens:\n        - {count: 1000000, duration: 1m}\n"
        "    keys:\n" + key_entries(warm=KEYS["warm"]) + "  burst:\n    context: /burst\n"
        "    provider: mock\n"
        f"    token_limits:\n      total_tokens:\n        - {{count: {LIMIT}, duration: 1m}}\n"
        "    keys:\n" + key_entries(first=KEYS["first"], again=KEYS["again"])
    )


async def send(client: httpx.AsyncClient, path: str, key: str, slow: bool) -> int:
    headers = {"Authorization": f"Bearer {key}", "X-Mock-Prompt-Rule": RULE}
    if slow:  # the burst's requests are in flight together
        headers.update({"X-Mock-Mode": "slow", "X-Mock-Delay": "0.3"})
    body = {"model": MODEL, "messages": [PROMPT], "max_tokens": MAX_TOKENS}
    answer = await client.post(f"{path}/chat/completions", json=body, headers=headers)
    assert answer.status_code in (200, 429), answer.text
    return answer.status_code


async def warm_up(gateway: Gateway, answers: int) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        for _ in range(answers):
            assert await send(client, "/warm", KEYS["warm"], slow=False) == 200


async def burst(gateway: Gateway, mock, key: str) -> int:
    """Tokens the provider served for one burst of BURST concurrent requests."""
    mock.reset()
    limits = httpx.Limits(max_connections=BURST)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30, limits=limits) as client:
        await asyncio.gather(*(send(client, "/burst", key, slow=True) for _ in range(BURST)))
    return mock.stats()["tokens_served"]["total"]


def stored(folder) -> Record | None:
    with sqlite3.connect(folder / ".state" / "tokengate.sqlite3") as db:
        row = db.execute(
            "SELECT record FROM learned WHERE key = ?", (key_of("mock", MODEL),)
        ).fetchone()
    return Record.parse(row[0]) if row else None


async def test_after_warm_up_a_burst_stays_within_and_a_restart_keeps_it(tmp_path, fresh_mock):
    config = write_quotas(tmp_path / "quotas.yaml", fresh_mock.url, quotas())
    gateway = Gateway.start(config, f"reverse:{fresh_mock.url}")
    try:
        await warm_up(gateway, 10)
        served = await burst(gateway, fresh_mock, KEYS["first"])
        assert LIMIT * 0.9 <= served <= LIMIT, served
    finally:
        gateway.stop()  # its last answers reach the store as it stops
    learned = stored(tmp_path)
    assert learned is not None and learned.answers >= 10
    assert 1.1 <= learned.bound <= 1.11

    gateway = Gateway.start(config, f"reverse:{fresh_mock.url}")
    try:
        await warm_up(gateway, 1)  # one answer: cold again, had nothing been kept
        served = await burst(gateway, fresh_mock, KEYS["again"])
        assert LIMIT * 0.9 <= served <= LIMIT, served
    finally:
        gateway.stop()
