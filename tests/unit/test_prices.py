"""Prices and cost: exact integer micro-dollars, the bundled table as genai-prices reads it,
`prices:` overrides, and the table imported only when a price is looked up in it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokengate_core.limiter import Usage
from tokengate_core.prices import (
    MAX_CACHED_MODELS,
    Price,
    PriceBook,
    PriceError,
    cost,
    parse_price,
    usd,
    usd_text,
)

GPT_4O = Price.usd("2.50", "10.00", cached_input="1.25")
CLAUDE = Price.usd("3", "15", cached_input="0.30", cache_write="3.75")


def stamp(year: int, month: int, day: int, hour: int = 12) -> float:
    return datetime(year, month, day, hour, tzinfo=UTC).timestamp()


# Cost arithmetic


def test_cost_prices_each_part_of_the_prompt_at_its_own_rate():
    # 800 fresh x 2.50 + 200 cached x 1.25 + 500 out x 10 = 7250 micro-dollars per 1M -> $0.00725
    assert cost(Usage(1000, 500, cached_prompt=200), GPT_4O) == 7250
    # Claude: 100 fresh x 3 + 300 read x 0.30 + 600 written x 3.75 + 50 out x 15
    usage = Usage(1000, 50, cached_prompt=300, cache_write=600)
    assert cost(usage, CLAUDE) == 300 + 90 + 2250 + 750


def test_reasoning_tokens_are_part_of_the_completion_and_never_priced_twice():
    plain = cost(Usage(100, 1000), GPT_4O)
    assert cost(Usage(100, 1000, reasoning=900), GPT_4O) == plain == 10_250


def test_cost_is_an_integer_rounded_up_never_a_float():
    one = cost(Usage(1, 0), Price.usd("0.15", "0.60"))  # 0.15 micro-dollars
    assert one == 1 and isinstance(one, int)
    assert cost(Usage(0, 0), GPT_4O) == 0
    # A month of tiny settlements adds up exactly: integers, summed.
    assert sum(cost(Usage(1000, 1000), GPT_4O) for _ in range(100_000)) == 100_000 * 12_500


def test_a_long_prompt_pays_the_long_context_rates_on_all_its_tokens():
    long = Price(6_000_000, 22_500_000, 600_000, 7_500_000)
    price = Price(3_000_000, 15_000_000, 300_000, 3_750_000, above=((200_000, long),))
    assert cost(Usage(200_000, 0), price) == 600_000
    assert cost(Usage(200_001, 10, cached_prompt=1), price) == 1_200_000 + 1 + 225


def test_usd_figures_are_exact():
    assert usd(7250) == 0.00725 and str(usd(7250)) == "0.00725"
    assert round(usd(123_456_789_012) * 1_000_000) == 123_456_789_012
    assert usd_text(7250) == "$0.007250" and usd_text(12_000_001) == "$12.000001"


# The bundled table


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook()


MODELS = ["gpt-4o", "gpt-4o-mini", "o4-mini", "gpt-5", "claude-sonnet-4-5", "gemini-2.5-pro"]


@settings(max_examples=60, deadline=None)
@given(
    model=st.sampled_from(MODELS),
    prompt=st.integers(0, 400_000),
    cached=st.integers(0, 100_000),
    written=st.integers(0, 100_000),
    completion=st.integers(0, 100_000),
    tier=st.sampled_from([None, "flex", "priority", "batch"]),
)
def test_cost_agrees_with_genai_prices(book, model, prompt, cached, written, completion, tier):
    """Our cached price and integer arithmetic give genai-prices' own figure, rounded up to the
    micro-dollar, for every kind of token, long-context rates and service tiers."""
    import genai_prices

    cached, written = min(cached, prompt), min(written, max(0, prompt - cached))
    at = stamp(2026, 11, 1)
    price = book.price(model, at=at)
    context = None
    if tier == "batch":
        context = {"processing": "batch"}
    elif tier is not None:
        context = {"service_tier": tier}
    usage = genai_prices.Usage(
        input_tokens=prompt,
        cache_read_tokens=cached,
        cache_write_tokens=written,
        output_tokens=completion,
    )
    theirs = genai_prices.calc_price(
        usage,
        model,
        genai_request_timestamp=datetime.fromtimestamp(at, UTC),
        price_context=context,
    )
    ours = cost(Usage(prompt, completion, cached_prompt=cached, cache_write=written), price, tier)
    if tier == "priority" and theirs.model_price == book_standard(theirs):
        # Not listed for this model: twice the standard price, an upper bound.
        assert ours == math.ceil(2 * theirs.total_price * 1_000_000)
    else:
        assert ours == math.ceil(theirs.total_price * 1_000_000)


def book_standard(calculation) -> object:
    return calculation.model.get_prices(datetime(2026, 11, 1, tzinfo=UTC))


def test_the_table_prices_known_models_and_knows_nothing_of_others(book):
    assert book.price("gpt-4o") == GPT_4O
    assert book.price("gpt-4o-2024-08-06") == GPT_4O  # dated names resolve as the provider bills
    assert book.price("my-own-llama") is None
    assert book.price("gpt-4o", api_url="https://api.openai.com/v1") == GPT_4O


def test_the_table_prices_a_call_as_of_its_time(book):
    assert book.price("o3", at=stamp(2025, 6, 9)).input == 10_000_000
    assert book.price("o3", at=stamp(2025, 6, 10)).input == 2_000_000
    # DeepSeek's off-peak rate holds from 16:30 to 00:30 UTC
    assert book.price("deepseek-chat", at=stamp(2026, 11, 1, 12)).input == 270_000
    assert book.price("deepseek-chat", at=stamp(2026, 11, 1, 20)).input == 135_000
    assert book.price("deepseek-chat", at=stamp(2026, 11, 2, 0)).input == 135_000
    assert book.price("deepseek-chat", at=stamp(2026, 11, 2, 1)).input == 270_000


def test_a_tier_the_table_does_not_list_costs_the_standard_price_or_twice_it_for_priority(book):
    price = book.price("gpt-4o", at=stamp(2026, 11, 1))
    usage = Usage(1000, 500)
    standard = cost(usage, price)
    assert cost(usage, price, "flex") == standard  # the table has no flex rate for gpt-4o
    assert cost(usage, price, "scale") == cost(usage, price, "default") == standard
    assert cost(usage, price, "batch") == standard // 2
    assert cost(usage, price, "priority") == 4250 + 8500  # the table's own priority rate
    assert cost(Usage(1000, 500, service_tier="batch"), price) == standard // 2  # as answered
    mine = PriceBook({"mine": Price.usd(1, 2)}).price("mine")
    assert cost(usage, mine, "priority") == 2 * cost(usage, mine)


def test_the_cache_of_resolved_models_is_bounded(book):
    for index in range(MAX_CACHED_MODELS + 10):
        book.price(f"no-such-model-{index}")
    assert len(book._cache) <= MAX_CACHED_MODELS


# Overrides


def test_overrides_come_first_exact_names_then_globs_in_file_order():
    llama = Price.usd("0.60", "0.80")
    book = PriceBook(
        {
            "llama-*": llama,
            "gpt-4o*": Price.usd(1, 1),
            "gpt-4o": Price.usd(9, 9),
            "*": Price.usd(5, 5),
        }
    )
    assert book.price("gpt-4o").input == 9_000_000
    assert book.price("gpt-4o-mini").input == 1_000_000
    assert book.price("llama-3-70b") == llama
    assert book.price("Llama-3").input == 5_000_000  # globs are case-sensitive, like names
    assert book.override("gpt-4o-mini").input == 1_000_000
    assert PriceBook({"llama-*": llama}).override("gpt-4o") is None  # the table is not asked


def test_parse_price_reads_usd_per_million_tokens():
    assert parse_price({"input": 2.5, "cached_input": 1.25, "output": 10}) == GPT_4O
    assert parse_price({"input": 0.6, "output": 0.8}) == Price(600_000, 800_000, 600_000, 600_000)
    assert parse_price({"input": "0.000001", "output": 0}).input == 1
    assert parse_price({"input": Decimal("3"), "output": 15, "cache_write": 3.75}).cache_write == (
        3_750_000
    )


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        ([1, 2], None, "must be a mapping"),
        ({"input": 1}, None, "needs 'output'"),
        ({"output": 1}, None, "needs 'input'"),
        ({"input": 1, "output": 1, "cached": 1}, "cached", "unknown field 'cached'"),
        ({"input": -1, "output": 1}, "input", "between 0 and"),
        ({"input": 1, "output": True}, "output", "must be a number"),
        ({"input": "cheap", "output": 1}, "input", "must be a number"),
        ({"input": float("nan"), "output": 1}, "input", "between 0 and"),
        ({"input": 1e9, "output": 1}, "input", "between 0 and"),
        ({"input": 0.0000001, "output": 1}, "input", "more than 6 decimals"),
    ],
)
def test_parse_price_says_what_is_wrong(raw, field, reason):
    with pytest.raises(PriceError, match=reason) as caught:
        parse_price(raw)
    assert caught.value.field == field


def test_the_table_is_imported_only_when_a_price_is_looked_up_in_it():
    """genai-prices and pydantic cost some 30 MB: loading the addon, parsing prices and pricing
    an overridden model leave them unimported; PriceBook.load (configuring a budget) imports
    them."""
    script = """
import sys
sys.path[:0] = ["addons"]
import tokengate
from tokengate_core.prices import PriceBook, parse_price
book = PriceBook({"mine": parse_price({"input": 1, "output": 2})})
assert book.price("mine").input == 1_000_000 and book.override("gpt-4o") is None
print("genai_prices" in sys.modules, "pydantic" in sys.modules)
PriceBook.load()
print("genai_prices" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out == ["False", "False", "True"]


def test_the_figures_script_runs(tmp_path):
    """docs/prices.md's figures come from a script: it runs as shown and prints each one."""
    from tests.support.docblocks import ROOT, blocks_for

    (block,) = blocks_for("tests/unit/test_prices.py::test_the_figures_script_runs")
    command = block.text.split("#")[0].strip().replace("python", sys.executable, 1)
    run = subprocess.run(
        [*command.split(), "--calls", "200", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": f"{ROOT / 'addons'}:{ROOT}", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout)
    assert 5 < figures["import_mb"] < 100
    assert figures["lookup_and_cost_us"] < figures["calc_price_us"]
