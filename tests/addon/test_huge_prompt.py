"""A huge prompt is estimated in bounded time, off the event loop, and never under-reserved."""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy import exceptions
from mitmproxy.test import tutils
from tokengate_core import notes, tokens
from tokengate_core.dialects import openai
from tokengate_core.quota import buckets_for

from tests.support.harness import reverse_flow, through

# Many short words: several characters per token, so counting by bytes is a real over-count.
PROSE = "The quick brown fox jumps over the lazy dog, said Émile at 12:34. "


def text_of(chars: int) -> str:
    return (PROSE * (chars // len(PROSE) + 1))[:chars]


@pytest.mark.parametrize("text", [text_of(5000), "東京 ünïcödé " * 300, "\ud800 lone " * 200])
def test_text_past_the_exact_part_is_bounded_by_its_bytes_never_below_the_count(text):
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}
    exact = openai.estimate_prompt("chat/completions", body)
    bounded = openai.estimate_prompt("chat/completions", body, exact_chars=100)
    framing = openai.TOKENS_REPLY_PRIMING + openai.TOKENS_PER_MESSAGE + len("user")  # bounded
    cut = tokens.clean_cut(text, 100)
    assert 0 < cut <= 100
    head, rest = tokens.count_text(text[:cut], "gpt-4o"), tokens.utf8_length(text[cut:])
    assert bounded == head + rest + framing
    assert bounded >= exact


def test_exact_part_is_shared_by_the_texts_of_one_prompt():
    first, second = text_of(600), text_of(600)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": [first, second]}]}
    count = tokens.PromptCounter("gpt-4o", exact_chars=1000)
    assert count(first) == tokens.count_text(first, "gpt-4o")
    cut = tokens.clean_cut(second, 400)  # what is left of the budget: its head is exact
    assert count(second) == tokens.count_text(second[:cut], "gpt-4o") + tokens.utf8_length(
        second[cut:]
    )
    assert count.left == 0
    assert openai.estimate_prompt("chat/completions", body, exact_chars=10**6) < (
        openai.estimate_prompt("chat/completions", body, exact_chars=1000)
    )


def test_a_100k_token_prompt_is_counted_exactly_by_default():
    text = text_of(450_000)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}
    assert (
        openai.estimate_prompt("chat/completions", body)
        == tokens.count_text(text, "gpt-4o") + tokens.count_text("user", "gpt-4o") + 6
    )


def test_tokenize_max_option_is_validated(gate_addons):
    tctx, gate, addons = gate_addons
    assert gate.exact_prompt_chars == 1024 * 1024
    with pytest.raises(exceptions.OptionsError, match="tokengate_tokenize_max: 'lots'"):
        tctx.configure(addons[0], tokengate_tokenize_max="lots")
    tctx.configure(addons[0], tokengate_tokenize_max="1k")
    assert gate.exact_prompt_chars == 1024


async def test_small_request_is_answered_while_a_huge_one_is_tokenized(make_gate):
    gate, addons, _ = make_gate(count=10**9)
    gate.exact_prompt_chars = 4 * 1024 * 1024
    exact_part = text_of(3_000_000)  # tokenized exactly: a good part of a second
    beyond = "x" * 2_000_000  # past the 4M characters counted exactly: bounded by its bytes
    huge = reverse_flow(
        body={
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "user", "content": exact_part},
                {"role": "user", "content": beyond},
            ],
            "max_tokens": 10,
        }
    )
    small = reverse_flow(body={"model": "gpt-4o-mini", "messages": [{"role": "user"}]})
    huge_admitted = asyncio.ensure_future(through(addons, ("requestheaders", "request"), huge))
    await asyncio.sleep(0)  # the huge one is on its way into the tokenizer
    await through(addons, ("requestheaders", "request"), small)
    small.response = tutils.tresp(
        content=json.dumps({"usage": {"prompt_tokens": 8, "completion_tokens": 2}}).encode()
    )
    await through(addons, ("responseheaders", "response"), small)
    assert small.response.headers["X-Tokens-Consumed"] == "10"
    assert not huge_admitted.done()  # the event loop served the small one meanwhile

    await huge_admitted
    state = notes.of(huge)
    exact = tokens.count_text(exact_part, "gpt-4o-mini")
    # The second role comes after the exact part is spent: its 4 bytes, not its 1 token.
    framing = openai.TOKENS_REPLY_PRIMING + 2 * openai.TOKENS_PER_MESSAGE + 1 + len("user")
    assert state["prompt_estimate"] == exact + len(beyond) + framing  # never below the real count
    assert state["reserved"] == {"prompt_tokens": state["prompt_estimate"], "completion_tokens": 10}
    reported = {"usage": {"prompt_tokens": exact + 250_000, "completion_tokens": 10}}
    huge.response = tutils.tresp(content=json.dumps(reported).encode())
    await through(addons, ("responseheaders", "response"), huge)
    await gate.writes.caught_up()
    (status,) = await gate.store.status(buckets_for(gate.proxy("p"), "alice"))
    assert (status.used, status.reserved) == (10 + exact + 250_000 + 10, 0)  # settled as reported
