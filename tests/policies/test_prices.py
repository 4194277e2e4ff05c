from __future__ import annotations

import pytest
from pydantic import ValidationError

from policies.prices import cache_savings_micro_usd, cost_micro_usd
from policies.schema import PriceConfig

PRICES = {
    "gpt-4o-mini": PriceConfig(input=0.15, output=0.60, cached_input=0.075),
    "local": PriceConfig(input=0, output=0),
    "no-cache-price": PriceConfig(input=2.5, output=10),
}


def test_cost_is_integer_micro_dollars() -> None:
    # 1,000 prompt tokens at $0.15/1M = 150 µ$; 500 completion tokens at $0.60/1M = 300 µ$.
    assert cost_micro_usd(PRICES, "gpt-4o-mini", 1_000, 500) == 450


def test_cached_prompt_tokens_use_the_cached_price() -> None:
    assert cost_micro_usd(PRICES, "gpt-4o-mini", 1_000, 0, cached=400) == 600 * 0.15 + 400 * 0.075
    assert cost_micro_usd(PRICES, "no-cache-price", 1_000, 0, cached=400) == 2_500


def test_unpriced_model_has_no_cost_and_free_model_costs_zero() -> None:
    assert cost_micro_usd(PRICES, "unknown", 10, 10) is None
    assert cost_micro_usd(PRICES, "local", 10_000, 10_000) == 0


ISSUE_PRICES = {"claude-haiku-4-5": PriceConfig(input=1.00, output=5.00, cached_input=0.10)}


def test_the_issues_cached_prompt_costs_1710_micro_dollars() -> None:
    # Served by Anthropic, 10 plain + 2,000 read + 1,000 written (5 min) + 50 out: 10 + 200 + 1,250 + 250.
    assert cost_micro_usd(ISSUE_PRICES, "claude-haiku-4-5", 3_010, 50, cached=2_000, cache_write=1_000,
                          anthropic=True) == 1_710
    # The same writes for an hour cost 2x the input price: 10 + 200 + 2,000 + 250.
    assert cost_micro_usd(ISSUE_PRICES, "claude-haiku-4-5", 3_010, 50, cached=2_000, cache_write=1_000,
                          cache_write_1h=1_000, anthropic=True) == 2_460


def test_unpriced_writes_elsewhere_cost_the_input_price() -> None:
    # OpenAI reports cache writes but bills them as input: 10 + 200 + 1,000 + 250.
    assert cost_micro_usd(ISSUE_PRICES, "claude-haiku-4-5", 3_010, 50, cached=2_000, cache_write=1_000,
                          cache_write_1h=300) == 1_460


def test_given_write_prices_replace_the_defaults() -> None:
    prices = {"m": PriceConfig(input=1, output=0, cache_write=3, cache_write_1h=7)}
    for anthropic in (False, True):
        assert cost_micro_usd(prices, "m", 100, 0, cache_write=30, cache_write_1h=10,
                              anthropic=anthropic) == 70 + 20 * 3 + 10 * 7


def test_parts_larger_than_the_prompt_cannot_bill_more_than_it() -> None:
    prices = {"m": PriceConfig(input=1, output=0, cached_input=0, cache_write=100)}
    assert cost_micro_usd(prices, "m", 10, 0, cached=50, cache_write=50) == 0
    assert cost_micro_usd(prices, "m", 10, 0, cached=4, cache_write=50) == 600


def test_costs_are_summed_exactly_and_rounded_once_half_up() -> None:
    # 0.1 + 0.2 is not 0.3 in floats; in pico-dollars it is.
    prices = {"m": PriceConfig(input=0.1, output=0.2)}
    assert cost_micro_usd(prices, "m", 1, 1) == 0
    assert cost_micro_usd(prices, "m", 5, 0) == 1  # 0.5 rounds up
    assert cost_micro_usd(prices, "m", 1_000_001, 1_000_001) == 300_000  # 300,000.3
    assert cost_micro_usd({"m": PriceConfig(input=2.5, output=0)}, "m", 3, 0) == 8  # 7.5 rounds up


def test_a_price_with_more_than_six_decimals_is_refused_with_its_path() -> None:
    with pytest.raises(ValidationError) as info:
        PriceConfig(input=0.0000001, output=1)
    assert "input: 1e-07 has more than 6 decimal places" in str(info.value)


def test_cache_savings_are_reads_at_the_input_price_minus_at_the_cached_price() -> None:
    assert cache_savings_micro_usd(ISSUE_PRICES, "claude-haiku-4-5", 2_000) == 1_800
    assert cache_savings_micro_usd(PRICES, "no-cache-price", 400) == 0
    assert cache_savings_micro_usd(PRICES, "unknown", 400) == 0
