"""Request cost from the policy's price table, in integer micro-dollars.

Prices are USD per 1M tokens, which is the same number as micro-dollars per token, so a cost is
a sum of token counts times prices. Integers keep sums exact in counters and in ClickHouse.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from policies.schema import PICO_PER_MICRO, EmbeddedProviderConfig, Policy, PriceConfig


def cost_micro_usd(
    prices: Mapping[str, PriceConfig], model: str, prompt: int, completion: int, cached: int = 0,
    cache_write: int = 0, cache_write_1h: int = 0, anthropic: bool = False,
) -> int | None:
    """Cost of one request to `model`, or None when the price table does not list it.

    `prompt` counts every prompt token, as OpenAI's usage reports them: `cached` of them were read from the prompt
    cache and `cache_write` written to it (`cache_write_1h` of those for an hour); the rest are plain input. Each
    kind is billed at its own price, in integer pico-dollars, and the sum is rounded half up to micro-dollars once.
    `anthropic`: an Anthropic provider served it, so unpriced cache writes cost Anthropic's rates.
    """
    price = prices.get(model)
    if price is None:
        return None
    plain_price, output_price, read_price, write_price, write_1h_price = price.pico(anthropic)
    cached = min(max(cached, 0), prompt)
    cache_write = min(max(cache_write, 0), prompt - cached)
    cache_write_1h = min(max(cache_write_1h, 0), cache_write)
    pico = ((prompt - cached - cache_write) * plain_price + cached * read_price
            + (cache_write - cache_write_1h) * write_price + cache_write_1h * write_1h_price + completion * output_price)
    return (pico + PICO_PER_MICRO // 2) // PICO_PER_MICRO


def cache_savings_micro_usd(prices: Mapping[str, PriceConfig], model: str, cached: int) -> int:
    """What `cached` prompt tokens read from the cache saved against the input price (0 for an unlisted model)."""
    price = prices.get(model)
    if price is None or cached <= 0:
        return 0
    plain_price, _, read_price, _, _ = price.pico()
    return (cached * max(plain_price - read_price, 0) + PICO_PER_MICRO // 2) // PICO_PER_MICRO


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


def unpriced_models(policy: Policy) -> list[tuple[str, str]]:
    """(route, model) for each routed external model the price table does not list: its requests cost nothing in
    the inference table and count nothing against budgets. Embedded models are free unless priced."""
    missing = []
    for name, route in policy.routes.items():
        for target in route.targets:
            model = target.model or name
            provider = policy.providers.get(target.provider)
            if model not in policy.prices and not isinstance(provider, EmbeddedProviderConfig):
                missing.append((name, model))
    return missing
