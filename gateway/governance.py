"""Steps 3, 4 and 9 of the pipeline: RBAC, rate limits and budgets before the call, charging after it.

A request on a route with prices, under a budget, reserves the most it may cost: its prompt tokens at the
route's dearest input price plus its max_completion_tokens (or max_tokens; `limiter.reserve_completion_tokens`
when it gives neither) times its number of choices at the dearest output price. Settle replaces the
reservation by the real cost.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter

from gateway import telemetry
from gateway.api.wire import call_function, reasoning_of, text_of
from gateway.errors import GatewayError
from gateway.exchange import Exchange
from gateway.providers import Usage
from policies import Admission, Authorizer, CounterStore, Governor, cost_micro_usd, open_counter_store
from policies.keys import Principal
from policies.prices import cache_savings_micro_usd, dearest_price, estimated_cost_micro_usd
from policies.schema import LimiterConfig, Policy, PriceConfig
from policies.tokens import count_prompt_tokens, count_text_tokens, encoding_ready, load_encoding, prepare_encodings

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
    # Their cache writes cost Anthropic's rates where the price table names none.
    anthropic_providers: frozenset[str] = frozenset()


def build_governance(policy: Policy, store: CounterStore, warm_decisions: bool = True) -> Governance:
    """Runs in a thread: Casbin evaluation and vocabulary loading must not stall the event loop. `warm_decisions`:
    decide every user on every route now (a reload, so no request waits for Casbin); the first version decides each
    pair when first asked instead (about a millisecond each), which keeps the warm-up off the start."""
    authorizer = Authorizer(policy)
    if warm_decisions:
        authorizer.warm()
    reserve_prices: dict[str, PriceConfig] = {}
    if policy.budgets:
        for name, route in policy.routes.items():
            price = dearest_price(policy.prices, [target.model or name for target in route.targets])
            if price is not None:
                reserve_prices[name] = price
    if reserve_prices or any(limit.tokens for limit in policy.limits):
        # The models requests are counted with: a target without one serves the route's name (gateway.compiled).
        prepare_encodings(target.model or name for name, route in policy.routes.items() for target in route.targets)
    anthropic = frozenset(name for name, provider in policy.providers.items() if provider.type == "anthropic")
    return Governance(authorizer, Governor(policy, store), dict(policy.prices), reserve_prices,
                      policy.limiter.reserve_completion_tokens, anthropic)


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
    if counted and not encoding_ready(route.targets[0].model):
        # Its encoding is still being built (prepare_encodings): the request waits for it, it is never let through
        # uncounted.
        await load_encoding(route.targets[0].model)
    prompt_tokens = count_prompt_tokens(route.targets[0].model, op, body) if counted else 0
    estimate = 0
    if price is not None:
        estimate = estimated_cost_micro_usd(price, prompt_tokens, _max_completion_tokens(op, body, gov))
    if counted:
        ex.counted_prompt_tokens = prompt_tokens
    admitting = gov.governor.admit(principal, route.name, prompt_tokens, estimate)
    admission = await (admitting if telemetry.TRACING is None else telemetry.TRACING.limits(ex, admitting))
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
    tokens = 0
    if usage is not None:
        if ex.model:
            cost = cost_micro_usd(gov.prices, ex.model, usage.prompt_tokens, usage.completion_tokens,
                                  usage.cached_tokens, usage.cache_write_tokens, usage.cache_write_1h_tokens,
                                  ex.provider in gov.anthropic_providers)
            ex.cost_micro_usd = cost or 0
            if usage.cached_tokens:
                ex.cache_savings_micro_usd = cache_savings_micro_usd(gov.prices, ex.model, usage.cached_tokens)
        tokens = usage.completion_tokens
        # Token windows were charged the gateway's count at admission; the upstream's count is the one billed. A
        # smaller count is not handed back: the window charged at admission may have rolled over since.
        counted = ex.counted_prompt_tokens
        if counted is not None and usage.prompt_tokens > counted:
            tokens += usage.prompt_tokens - counted
    # Not awaited: the answer does not wait for the limiter's store, and a client that disconnects cannot keep
    # its tokens and cost off the books.
    gov.governor.settle_soon(admission, tokens, ex.cost_micro_usd or None)


def answer_text(data: dict, op: str) -> str:
    """The text of a whole answer that the upstream billed as completion: contents, reasoning, tool calls."""
    if op == "embeddings":
        return ""
    parts: list[str] = []
    choices = data.get("choices")
    for choice in choices if type(choices) is list else ():
        if type(choice) is not dict:
            continue
        if op != "chat":
            parts.append(text_of(choice.get("text")))
            continue
        message = choice.get("message")
        if type(message) is not dict:
            continue
        parts += (text_of(message.get("content")), reasoning_of(message))
        calls = message.get("tool_calls")
        for call in calls if type(calls) is list else ():
            if type(call) is dict:
                parts += call_function(call)
    return "".join(parts)


# Of an answer's text, this much is kept and counted; the rest is counted at the kept part's tokens per character,
# so an answer without usage costs bounded memory and counting time, however long it is.
ESTIMATE_TEXT_CHARS = 256 * 1024


class TextTally:
    """A streamed answer's text, kept up to ESTIMATE_TEXT_CHARS, and the length of all of it."""

    __slots__ = ("chars", "kept", "parts")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.kept = 0
        self.chars = 0

    def add(self, text: str) -> None:
        self.chars += len(text)
        if self.kept < ESTIMATE_TEXT_CHARS:
            self.parts.append(text)
            self.kept += len(text)

    def text(self) -> str:
        return "".join(self.parts)


def _completion_tokens(model: str, text: str, chars: int) -> int:
    kept = text[:ESTIMATE_TEXT_CHARS]
    if not kept:
        return 0
    tokens = count_text_tokens(model, kept)
    return tokens if len(kept) >= chars else round(tokens * chars / len(kept))


def _estimate(model: str, op: str, body: dict, text: str, chars: int, counted: int | None) -> Usage:
    prompt = counted if counted is not None else count_prompt_tokens(model, op, body)
    return Usage(prompt, _completion_tokens(model, text, max(chars, len(text))), estimated=True)


async def estimate_usage(ex: Exchange, model: str, op: str, body: dict) -> Usage:
    """The usage of an answer that came without one (a server that omits it, a stream cut short), counted with
    tiktoken; in a thread, since the first count of a model loads its vocabulary."""
    return await asyncio.to_thread(_estimate, ex.model or model, op, body, ex.answer_text or "", ex.answer_chars,
                                   ex.counted_prompt_tokens)
