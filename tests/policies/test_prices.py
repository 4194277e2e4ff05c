from __future__ import annotations

from policies.prices import cost_micro_usd
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
