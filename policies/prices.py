"""Request cost from the policy's price table, in integer micro-dollars.

Prices are USD per 1M tokens, which is the same number as micro-dollars per token, so a cost is
a sum of token counts times prices. Integers keep sums exact in counters and in ClickHouse.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from policies.schema import PriceConfig


def cost_micro_usd(
    prices: Mapping[str, PriceConfig], model: str, prompt: int, completion: int, cached: int = 0
) -> int | None:
    """Cost of one request to `model`, or None when the price table does not list it.

    `prompt` counts every prompt token, cached ones included (as OpenAI's usage reports them);
    `cached` of them are billed at `cached_input`, or at `input` when no cached price is given.
    """
    price = prices.get(model)
    if price is None:
        return None
    cached = min(max(cached, 0), prompt)
    cached_price = price.input if price.cached_input is None else price.cached_input
    micro = (prompt - cached) * price.input + cached * cached_price + completion * price.output
    return round(micro)


def dearest_price(prices: Mapping[str, PriceConfig], models: Iterable[str]) -> PriceConfig | None:
    """The highest input and output prices among `models` (a route's targets): what a request may cost at most,
    wherever it is served. None when the table lists none of them."""
    listed = [prices[model] for model in models if model in prices]
    if not listed:
        return None
    return PriceConfig(input=max(p.input for p in listed), output=max(p.output for p in listed))


def estimated_cost_micro_usd(price: PriceConfig, prompt: int, max_completion: int) -> int:
    """The most a request may cost: its prompt and up to `max_completion` completion tokens, rounded up."""
    return math.ceil(prompt * price.input + max_completion * price.output)


def usd(micro: int) -> float:
    return micro / 1_000_000
