"""Steps 3, 4 and 9 of the pipeline: RBAC, rate limits and budgets before the call, charging after it.

A request on a route with prices, under a budget, reserves the most it may cost: its prompt tokens at the
route's dearest input price plus its max_completion_tokens (or max_tokens; `limiter.reserve_completion_tokens`
when it gives neither) times its number of choices at the dearest output price. Settle replaces the
reservation by the real cost.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter

from gateway.errors import GatewayError
from gateway.exchange import Exchange
from policies import Admission, Authorizer, CounterStore, Governor, cost_micro_usd, open_counter_store
from policies.keys import Principal
from policies.prices import dearest_price, estimated_cost_micro_usd
from policies.schema import LimiterConfig, Policy, PriceConfig
from policies.tokens import count_prompt_tokens, encoding_for

if TYPE_CHECKING:
    from gateway.compiled import Route

LIMITER_ERRORS = Counter("lockgate_limiter_errors", "Rate-limit storage failures (Redis unreachable or slow)")
REFUSALS = Counter("lockgate_limit_refusals", "Requests refused by rate limits, budgets or RBAC", ["code"])
DEGRADED = Counter("lockgate_limit_degraded", "Requests let through unchecked because on_error is allow")
LIMITER_LOST = Counter("lockgate_limiter_lost", "Limiter writes given up after retries: a settle (usage not charged) "
                       "or the release of a timed-out admission (its slot or reservation held until its lease ends)",
                       ["kind"])
_MAX_CHOICES = 128


@dataclass(frozen=True, slots=True)
class Governance:
    authorizer: Authorizer
    governor: Governor
    prices: dict[str, PriceConfig]
    # Only routes with a price, and only when budgets exist: the others reserve nothing.
    reserve_prices: dict[str, PriceConfig]
    reserve_completion_tokens: int


def build_governance(policy: Policy, store: CounterStore) -> Governance:
    """Runs in a thread: Casbin evaluation and vocabulary loading must not stall the event loop."""
    authorizer = Authorizer(policy)
    authorizer.warm()
    reserve_prices: dict[str, PriceConfig] = {}
    if policy.budgets:
        for name, route in policy.routes.items():
            price = dearest_price(policy.prices, [target.model or name for target in route.targets])
            if price is not None:
                reserve_prices[name] = price
    if reserve_prices or any(limit.tokens for limit in policy.limits):
        for route in policy.routes.values():
            for target in route.targets:
                encoding_for(target.model or "")
    return Governance(authorizer, Governor(policy, store), dict(policy.prices), reserve_prices,
                      policy.limiter.reserve_completion_tokens)


class CounterStores:
    """The limiter's storage outlives policy versions, so counters survive reloads; replaced when its settings change."""

    def __init__(self) -> None:
        self._current: tuple[tuple[str, int, int], CounterStore] | None = None
        self._retired: list[CounterStore] = []

    def store_for(self, config: LimiterConfig) -> CounterStore:
        settings = (config.storage, config.timeout_ms, config.max_connections)
        if self._current is not None and self._current[0] == settings:
            return self._current[1]
        store = open_counter_store(config.storage, config.timeout_ms / 1000, config.max_connections,
                                   lambda _reason: LIMITER_ERRORS.inc(), lambda kind: LIMITER_LOST.labels(kind).inc())
        if self._current is not None:
            self._retired.append(self._current[1])
        self._current = (settings, store)
        return store

    async def close(self) -> None:
        stores = self._retired + ([self._current[1]] if self._current else [])
        self._current, self._retired = None, []
        for store in stores:
            with contextlib.suppress(Exception):
                await store.close()


def _refusal(admission: Admission) -> GatewayError:
    code = admission.code or "rate_limit_exceeded"
    REFUSALS.labels(code).inc()
    headers = admission.headers()
    if code == "limiter_unavailable":
        return GatewayError(503, admission.message, "api_error", code, headers=headers)
    kind = "insufficient_quota" if code == "budget_exceeded" else "rate_limit_error"
    return GatewayError(429, admission.message, kind, code, headers=headers)


async def admit(gov: Governance, principal: Principal, route: Route, op: str, body: dict, ex: Exchange) -> Admission:
    if not gov.authorizer.can_call(principal, route.name):
        REFUSALS.labels("model_not_permitted").inc()
        ex.ratelimit_outcome = "forbidden"
        raise GatewayError(403, f"You are not allowed to use the model `{route.name}`.",
                           "invalid_request_error", "model_not_permitted", "model")
    plan = gov.governor.plan(principal, route.name)
    price = gov.reserve_prices.get(route.name)
    # Counting costs ~0.1 ms a message: only when a token limit or a reservation needs it. The first
    # target's tokenizer stands for the route's; the real completion is charged in settle().
    counted = plan.token_windows or price is not None
    prompt_tokens = count_prompt_tokens(route.targets[0].model, op, body) if counted else 0
    estimate = 0
    if price is not None:
        estimate = estimated_cost_micro_usd(price, prompt_tokens, _max_completion_tokens(op, body, gov))
    admission = await gov.governor.admit(principal, route.name, prompt_tokens, estimate)
    if not admission.allowed:
        ex.ratelimit_outcome = f"refused:{admission.code}"
        raise _refusal(admission)
    if admission.degraded:
        DEGRADED.inc()
        ex.ratelimit_outcome = "unchecked:storage_down"
    return admission


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _max_completion_tokens(op: str, body: dict, gov: Governance) -> int:
    """The most completion tokens the request asks for, over all its choices."""
    if op == "embeddings":
        return 0
    per_choice = (_positive_int(body.get("max_completion_tokens")) or _positive_int(body.get("max_tokens"))
                  or gov.reserve_completion_tokens)
    choices = max(_positive_int(body.get("n")) or 1, _positive_int(body.get("best_of")) or 1)
    return per_choice * min(choices, _MAX_CHOICES)


async def settle(gov: Governance, admission: Admission, ex: Exchange) -> None:
    usage = ex.usage
    if usage is not None and ex.model:
        cost = cost_micro_usd(gov.prices, ex.model, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
        ex.cost_micro_usd = cost or 0
    completion = usage.completion_tokens if usage is not None else 0
    # Not awaited: the answer does not wait for the limiter's store, and a client that disconnects cannot keep
    # its tokens and cost off the books.
    gov.governor.settle_soon(admission, completion, ex.cost_micro_usd or None)
