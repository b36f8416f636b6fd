"""A prompt longer than the exact budget: its first part is counted exactly, only the rest is
bounded by its bytes, and the sum never falls below the real count."""

from __future__ import annotations

import random

import pytest
from tokengate_core import notes, tokens
from tokengate_core.dialects import openai

from tests.support.harness import reverse_flow, through

# Long words: about 6 characters per token, as in the prompt a user was refused for.
LONG_WORDS = "Operators configure quotas, providers and contexts in one human readable file. "
MILLION = 1024 * 1024  # the default exact budget
# Texts that try the seam: runs of mixed whitespace, contractions, digits, CJK, astral
# characters as one code point and as a surrogate pair, a lone surrogate, characters that
# Python and the tokenizer may see differently.
PIECES = [
    "ab", " ", " ", "  ", "\n", "\t", "\r\n", ".", ",", "'s", "don't", "-", "1234", "東京",
    "ü", "😀", "\ud83d\ude00", "\ud800", "\u00a0", "\x1c", "word",
]  # fmt: skip


def user_prompt(text: str) -> dict:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}


def long_prompt() -> str:
    return (LONG_WORDS * (1_105_723 // len(LONG_WORDS) + 1))[:1_105_723]


def test_a_prompt_past_the_budget_is_exact_up_to_it_and_bounded_after():
    text = long_prompt()
    real = tokens.count_text(text, "gpt-4o")
    assert 150_000 < real < 200_000  # the refused prompt had 186,919 tokens
    estimate = openai.estimate_prompt("chat/completions", user_prompt(text))
    cut = tokens.clean_cut(text, MILLION)
    assert MILLION - len(LONG_WORDS) < cut <= MILLION  # within a word of the budget
    framing = openai.TOKENS_REPLY_PRIMING + openai.TOKENS_PER_MESSAGE + len("user")
    head, rest = tokens.count_text(text[:cut], "gpt-4o"), tokens.utf8_length(text[cut:])
    assert estimate == head + rest + framing
    assert real < estimate < 500_000  # bounded as a whole, it was 1,105,733


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])  # o200k_base and cl100k_base
def test_a_cut_anywhere_never_counts_below_the_real_count(model):
    draw = random.Random(16)
    encoding = tokens.encoding_for_model(model)
    for _ in range(300):
        text = "".join(draw.choice(PIECES) for _ in range(draw.randint(1, 40)))
        real = encoding.encode(text, disallowed_special=())
        for budget in range(len(text)):
            assert tokens.PromptCounter(model, budget)(text) >= len(real), (text, budget)
            cut = tokens.clean_cut(text, budget)
            head = encoding.encode(text[:cut], disallowed_special=())
            # The head is read as the whole text reads it: the same first tokens.
            assert real[: len(head)] == head, (text, cut)


def test_a_cut_is_before_a_space_that_follows_a_non_space():
    assert tokens.clean_cut("one two", 5) == 3
    assert tokens.clean_cut("one \n two", 8) == 3  # the space after a newline is no cut
    assert tokens.clean_cut("one two", 3) == 3  # the budget itself may be the place
    assert tokens.clean_cut("東京😀" * 10, 20) == 0  # no space: bounded as a whole
    far = "word " + "x" * (tokens.CUT_SEARCH_CHARS + 10)
    assert tokens.clean_cut(far, len(far) - 1) == 0  # looked for near the budget only


async def test_the_gate_admits_a_long_prompt_that_fits(make_gate):
    _, addons, _ = make_gate(count=500_000)
    body = {**user_prompt(long_prompt()), "model": "gpt-4o-mini", "max_tokens": 10}
    flow = reverse_flow(body=body)
    await through(addons, ("requestheaders", "request"), flow)
    assert flow.response is None, flow.response and flow.response.text
    state = notes.of(flow)
    assert state["prompt_estimate"] < 400_000
