"""Steps 3, 4 and 9 of the pipeline: RBAC, rate limits and budgets before the call, charging after it."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter

from gateway.errors import GatewayError
from gateway.exchange import Exchange
from policies import Admission, Authorizer, CounterStore, Governor, cost_micro_usd, open_counter_store
from policies.keys import Principal
from policies.schema import LimiterConfig, Policy, PriceConfig
from policies.tokens import count_prompt_tokens, encoding_for

if TYPE_CHECKING:
    from gateway.compiled import Route

LIMITER_ERRORS = Counter("lockgate_limiter_errors", "Rate-limit storage failures (Redis unreachable or slow)")
REFUSALS = Counter("lockgate_limit_refusals", "Requests refused by rate limits, budgets or RBAC", ["code"])
DEGRADED = Counter("lockgate_limit_degraded", "Requests let through unchecked because on_error is allow")


@dataclass(frozen=True, slots=True)
class Governance:
    authorizer: Authorizer
    governor: Governor
    prices: dict[str, PriceConfig]


def build_governance(policy: Policy, store: CounterStore) -> Governance:
    """Runs in a thread: Casbin evaluation and vocabulary loading must not stall the event loop."""
    authorizer = Authorizer(policy)
    authorizer.warm()
    if any(limit.tokens for limit in policy.limits):
        for route in policy.routes.values():
            for target in route.targets:
                encoding_for(target.model or "")
    return Governance(authorizer, Governor(policy, store), dict(policy.prices))


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
                                   lambda _reason: LIMITER_ERRORS.inc())
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
    # Counting costs ~0.1 ms a message: only when a token limit applies. The first target's tokenizer
    # stands for the route's; the real completion is charged in settle().
    prompt_tokens = count_prompt_tokens(route.targets[0].model, op, body) if plan.token_windows else 0
    admission = await gov.governor.admit(principal, route.name, prompt_tokens)
    if not admission.allowed:
        ex.ratelimit_outcome = f"refused:{admission.code}"
        raise _refusal(admission)
    if admission.degraded:
        DEGRADED.inc()
        ex.ratelimit_outcome = "unchecked:storage_down"
    return admission


async def settle(gov: Governance, admission: Admission, ex: Exchange) -> None:
    usage = ex.usage
    if usage is not None and ex.model:
        cost = cost_micro_usd(gov.prices, ex.model, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
        ex.cost_micro_usd = cost or 0
    completion = usage.completion_tokens if usage is not None else 0
    # Shielded: a client that disconnects must not keep its tokens and cost off the books.
    await asyncio.shield(gov.governor.settle(admission, completion, ex.cost_micro_usd or None))
