"""The `prices:` section of quotas.yaml: USD per 1M tokens by model, each mistake on its line."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokengate_core.config import load_config
from tokengate_core.prices import Price, PriceBook

from tests.unit.test_config import ENV, VALID, expect_error, marked_line, write

PRICES = """\
prices:
  my-llama-70b: {input: 0.60, output: 0.80}
  gpt-4o: {input: 2.50, cached_input: 1.25, output: 10.00}
  "claude-*":
    input: 3
    cached_input: 0.30
    cache_write: 3.75
    output: 15
"""


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder where VALID loads: its provider key file, its environment variable."""
    monkeypatch.setenv(ENV, "sk-from-env")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "provider.key").write_text("sk-from-file\n", encoding="utf-8")
    return tmp_path


def test_prices_load_by_model_name_and_glob(setup: Path) -> None:
    config = load_config(write(setup, PRICES + VALID))
    assert config.prices == {
        "my-llama-70b": Price(600_000, 800_000, 600_000, 600_000),
        "gpt-4o": Price(2_500_000, 10_000_000, 1_250_000, 2_500_000),
        "claude-*": Price(3_000_000, 15_000_000, 300_000, 3_750_000),
    }
    book = PriceBook(config.prices)
    assert book.price("claude-opus-4").cache_write == 3_750_000


def test_a_file_without_prices_has_none(setup: Path) -> None:
    assert load_config(write(setup, VALID)).prices == {}


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("  gpt-4o: {input: 2.5, output: -1}  # HERE\n", "output must be between 0 and"),
        ("  gpt-4o: {input: 2.5}  # HERE\n", "a price needs 'output'"),
        ("  gpt-4o: 2.5  # HERE\n", "must be a mapping"),
        (
            "  gpt-4o:\n    input: 1\n    output: 2\n    cached: 1  # HERE\n",
            "unknown field 'cached'",
        ),
        ("  gpt-4o:\n    input: yes  # HERE\n    output: 2\n", "input must be a number"),
        ("  gpt-4o: {input: 0.0000001, output: 1}  # HERE\n", "more than 6 decimals"),
    ],
)
def test_a_bad_price_names_its_line_and_reason(setup: Path, entry: str, reason: str) -> None:
    text = "prices:\n" + entry + VALID
    expect_error(write(setup, text), marked_line(text), reason)


def test_prices_must_be_a_mapping(setup: Path) -> None:
    text = "prices: [gpt-4o]  # HERE\n" + VALID
    expect_error(write(setup, text), marked_line(text), "must be a mapping")
