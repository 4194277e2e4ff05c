"""Rate limits, parallel-request limits and spend budgets, checked together before a request.

A Governor is built once per policy version over a CounterStore that lives as long as the process
(so counters survive policy reloads). On the hot path:

    admission = await governor.admit(principal, route, prompt_tokens, estimate)  # refuse when not allowed
    ...forward the request...
    governor.settle_soon(admission, completion_tokens, cost_micro_usd)             # always, in `finally`

(`await governor.settle(...)` is the same, waiting for the store's answer.)

`estimate` is the most the request can cost (micro-USD); it is reserved on every budget that applies
until settle replaces it by the real cost, so concurrent requests cannot spend past a budget.
A store that fails never leaves anything taken for long: an admission that timed out is voided in
the background, and a settle that failed is retried in the background (counted in `store.lost` when
every try fails).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from limits import parse

from policies.budgets import BudgetCheck, BudgetRule, budget_check, compile_budgets
from policies.keys import Principal
from policies.limiter_storage import (
    CapSpec,
    CounterStore,
    SlotSpec,
    Snapshot,
    StorageUnavailable,
    WindowCount,
    WindowSpec,
    weighted_count,
    window_blocks,
)
from policies.schema import LimitConfig, Policy

KEY_PREFIX = "lg:rate:"
_MAX_CACHED_PLANS = 100_000
_admission_ids = itertools.count()
_process_tag = secrets.token_hex(6)
_RELEASE_DELAYS_S = (0.0, 0.5, 2.0, 5.0)
_SETTLE_DELAYS_S = (0.5, 2.0, 5.0)
# A settle is retried for less than this, so while its lease has at least this long to run, the lease
# tells whether an earlier try already charged.
_VERIFY_MARGIN_MS = 60_000


@dataclass(frozen=True, slots=True)
class LimitRule:
    """One `limits:` entry, compiled: which principals and routes it applies to and its counters."""

    scope: str
    routes: tuple[str, ...]
    requests: tuple[int, int] | None
    tokens: tuple[int, int] | None
    max_parallel: int | None
    ident: str

    def applies(self, principal: Principal, route: str) -> bool:
        if not any(fnmatchcase(route, pattern) for pattern in self.routes):
            return False
        if self.scope.startswith("group:"):
            return self.scope[6:] in principal.groups
        if self.scope.startswith("route:"):
            return fnmatchcase(route, self.scope[6:])
        return True

    def subject(self, principal: Principal) -> str:
        if self.scope == "user":
            return f"user:{principal.user}"
        if self.scope == "key":
            return f"key:{principal.key_id}"
        return self.scope


def _rate(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    item = parse(text)
    return item.amount, item.get_expiry() * 1000


def compile_limit(config: LimitConfig) -> LimitRule:
    # Counters are named by what the limit means, so an unrelated edit or a reorder keeps them.
    ident = hashlib.sha1("|".join(config.routes).encode()).hexdigest()[:8]
    return LimitRule(
        config.scope, tuple(config.routes), _rate(config.requests), _rate(config.tokens), config.max_parallel, ident
    )


@dataclass(slots=True)
class WindowState:
    """One window's numbers for OpenAI's x-ratelimit-* headers."""

    limit: int
    used: int
    remaining: int
    reset_s: float


def _state(spec: WindowSpec, count: WindowCount) -> WindowState:
    previous, current, elapsed_ms = count
    window = spec.window_ms
    weighted = weighted_count(count, window)
    if current > 0:
        reset_ms = 2 * window - elapsed_ms
    elif previous > 0:
        reset_ms = window - elapsed_ms
    else:
        reset_ms = 0
    return WindowState(spec.limit, weighted, max(0, spec.limit - weighted), reset_ms / 1000)


def retry_wait_ms(spec: WindowSpec, count: WindowCount, amount: int) -> int:
    """How long until the weighted count leaves room for `amount` (the window slides on by itself)."""
    previous, current, elapsed_ms = count
    window, target = spec.window_ms, spec.limit - max(amount, 1)
    if current <= target:
        if previous == 0:
            return 0
        # floor(previous * (window - t) / window) <= target - current once t passes this point.
        after = window - (target - current + 1) * window / previous
        return max(0, math.ceil(after) + 1 - elapsed_ms)
    after_next = max(0.0, window - (target + 1) * window / current)
    return window - elapsed_ms + math.ceil(after_next) + 1


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s", "1h2m3s"."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _tightest(specs: Sequence[WindowSpec], counts: Sequence[WindowCount]) -> WindowState | None:
    """The window with the least room left (on a tie, the smaller limit), for the headers."""
    # No tuple per window to compare: this runs twice for every admitted request.
    best: tuple[WindowSpec, WindowCount] | None = None
    best_room = best_limit = 0
    for spec, count in zip(specs, counts, strict=True):
        limit = spec.limit
        room = max(0, limit - weighted_count(count, spec.window_ms))
        if best is None or room < best_room or (room == best_room and limit < best_limit):
            best, best_room, best_limit = (spec, count), room, limit
    return None if best is None else _state(*best)


@dataclass(frozen=True, slots=True)
class Plan:
    """The counters one (principal, route) touches, resolved once per policy version."""

    request_windows: tuple[WindowSpec, ...]
    token_windows: tuple[WindowSpec, ...]
    slots: tuple[SlotSpec, ...]
    subjects: list[str]
    # Tuples, and the same ones on every call: the store may encode them once (see RedisCounterStore).
    windows: tuple[WindowSpec, ...]


@dataclass(slots=True)
class Admission:
    """The outcome of `admit`; hand it back to `settle` when the request ends."""

    allowed: bool
    code: str | None = None
    message: str = ""
    retry_after_s: int | None = None
    requests: WindowState | None = None
    tokens: WindowState | None = None
    degraded: bool = False
    plan: Plan | None = None
    budgets: BudgetCheck | None = None
    member: str = ""
    estimate: int = 0
    admitted_at: float = 0.0
    settled: bool = False

    def headers(self) -> dict[str, str]:
        """OpenAI's rate-limit headers for the tightest request and token limits, and Retry-After."""
        out: dict[str, str] = {}
        for kind, state in (("requests", self.requests), ("tokens", self.tokens)):
            if state is not None:
                out[f"x-ratelimit-limit-{kind}"] = str(state.limit)
                out[f"x-ratelimit-remaining-{kind}"] = str(state.remaining)
                out[f"x-ratelimit-reset-{kind}"] = format_duration(state.reset_s)
        if self.retry_after_s is not None:
            out["retry-after"] = str(self.retry_after_s)
        return out


@dataclass(slots=True)
class _Settlement:
    """What one settle writes, kept for its retries."""

    windows: tuple[WindowSpec, ...]
    tokens: int
    caps: tuple[CapSpec, ...]
    spend: int
    ttl_ms: list[int]
    slots: tuple[SlotSpec, ...]
    member: str
    admitted_at: float


class Governor:
    def __init__(self, policy: Policy, store: CounterStore) -> None:
        self._store = store
        self._deny_on_error = policy.limiter.on_error == "deny"
        self._lease_ms = int(policy.limiter.parallel_lease_s * 1000)
        self._rules = [compile_limit(c) for c in policy.limits]
        self._budgets: list[BudgetRule] = compile_budgets(policy.budgets)
        self._plans: dict[tuple[Principal, str], Plan] = {}
        self._budget_checks: dict[Principal, BudgetCheck] = {}

    @property
    def store(self) -> CounterStore:
        return self._store

    def plan(self, principal: Principal, route: str) -> Plan:
        found = self._plans.get((principal, route))
        if found is not None:
            return found
        request_windows: dict[str, WindowSpec] = {}
        token_windows: dict[str, WindowSpec] = {}
        slots: dict[str, SlotSpec] = {}
        subjects: dict[str, str] = {}
        for rule in self._rules:
            if not rule.applies(principal, route):
                continue
            base = f"{KEY_PREFIX}{rule.subject(principal)}:{rule.ident}"
            for kind, rate, into in (("req", rule.requests, request_windows), ("tok", rule.tokens, token_windows)):
                if rate is not None:
                    key = f"{base}:{kind}:{rate[0]}/{rate[1]}"
                    into[key] = WindowSpec(key, rate[0], rate[1])
                    subjects[key] = rule.subject(principal)
            if rule.max_parallel is not None:
                key = f"{base}:par"
                slots[key] = SlotSpec(key, rule.max_parallel)
                subjects[key] = rule.subject(principal)
        keys = [*request_windows, *token_windows, *slots]
        plan = Plan(tuple(request_windows.values()), tuple(token_windows.values()), tuple(slots.values()),
                    [subjects[k] for k in keys], (*request_windows.values(), *token_windows.values()))
        if len(self._plans) >= _MAX_CACHED_PLANS:
            self._plans.clear()
        self._plans[(principal, route)] = plan
        return plan

    def _budget_check(self, principal: Principal) -> BudgetCheck:
        found = self._budget_checks.get(principal)
        if found is None or time.time() >= found.valid_until:
            if len(self._budget_checks) >= _MAX_CACHED_PLANS:
                self._budget_checks.clear()
            found = self._budget_checks[principal] = budget_check(self._budgets, principal)
        return found

    async def admit(
        self, principal: Principal, route: str, prompt_tokens: int = 0, estimate_micro_usd: int = 0
    ) -> Admission:
        plan = self.plan(principal, route)
        budgets = self._budget_check(principal) if self._budgets else None
        caps = budgets.caps if budgets is not None else ()
        windows = plan.windows
        if not windows and not plan.slots and not caps:
            return Admission(True)
        amounts = [1] * len(plan.request_windows) + [prompt_tokens] * len(plan.token_windows)
        estimate = max(0, estimate_micro_usd) if caps else 0
        member = f"{_process_tag}-{next(_admission_ids)}" if plan.slots or estimate else ""
        admitted_at = time.monotonic()
        try:
            snap = await self._store.check_and_take(windows, amounts, plan.slots, caps, member, self._lease_ms, estimate)
        except asyncio.CancelledError:
            if member:
                self._void(plan, caps if estimate else (), member)
            raise
        except StorageUnavailable as exc:
            if member and exc.maybe_applied:
                self._void(plan, caps if estimate else (), member)
            if self._deny_on_error:
                return Admission(False, "limiter_unavailable", f"The rate limiter's storage is unavailable ({exc}).", 1)
            # Unchecked, but its real usage is still charged when it settles.
            return Admission(True, degraded=True, plan=plan, budgets=budgets)
        split = len(plan.request_windows)
        admission = Admission(
            snap.allowed, requests=_tightest(plan.request_windows, snap.windows[:split]),
            tokens=_tightest(plan.token_windows, snap.windows[split:]),
            plan=plan, budgets=budgets, member=member, estimate=estimate, admitted_at=admitted_at,
        )
        if not snap.allowed:
            self._explain_refusal(admission, windows, amounts, snap)
        return admission

    def _void(self, plan: Plan, reserved_caps: tuple[CapSpec, ...], member: str) -> None:
        # The script may have run after we gave up: void its lease so no slot or reservation stays taken.
        self._store.retry_in_background(
            "release", lambda: self._store.release(plan.slots, reserved_caps, member, self._lease_ms), _RELEASE_DELAYS_S
        )

    def _explain_refusal(
        self,
        admission: Admission,
        windows: tuple[WindowSpec, ...],
        amounts: list[int],
        snap: Snapshot,
    ) -> None:
        plan = admission.plan
        assert plan is not None
        admission.settled = True
        waits: list[int] = []
        for i, (spec, amount, count) in enumerate(zip(windows, amounts, snap.windows, strict=True)):
            if not window_blocks(count, spec.limit, spec.window_ms, amount):
                continue
            kind = "requests" if i < len(plan.request_windows) else "tokens"
            per = format_duration(spec.window_ms / 1000)
            if amount > spec.limit:
                admission.code = "request_too_large"
                admission.message = (
                    f"Request too large for {plan.subjects[i]}: {amount} prompt tokens, "
                    f"but the limit is {spec.limit} tokens per {per}."
                )
                admission.retry_after_s = None
                return
            waits.append(retry_wait_ms(spec, count, amount))
            admission.code = admission.code or "rate_limit_exceeded"
            admission.message = admission.message or (
                f"Rate limit reached for {plan.subjects[i]}: {spec.limit} {kind} per {per}."
            )
        offset = len(windows)
        for j, (slot, used) in enumerate(zip(plan.slots, snap.slots_in_use, strict=True)):
            if used >= slot.limit:
                waits.append(1000)
                admission.code = admission.code or "rate_limit_exceeded"
                admission.message = admission.message or (
                    f"Too many parallel requests for {plan.subjects[offset + j]}: at most {slot.limit} at once."
                )
        budgets = admission.budgets
        budget_message = budgets.refusal(snap.spent, snap.reserved, admission.estimate) if budgets is not None else None
        if budgets is not None and budget_message is not None:
            admission.code, admission.message = "budget_exceeded", budget_message
            waits.append(budgets.retry_after_s(snap.spent, snap.reserved, admission.estimate) * 1000)
        admission.retry_after_s = max(1, math.ceil(max(waits, default=1000) / 1000))
        if admission.message:
            admission.message += f" Retry after {admission.retry_after_s} s."

    def _settlement(self, admission: Admission, completion_tokens: int, cost_micro_usd: int | None) -> _Settlement | None:
        if admission.settled or admission.plan is None:
            return None
        admission.settled = True
        plan, budgets, member = admission.plan, admission.budgets, admission.member
        spend = max(0, cost_micro_usd or 0)
        caps = budgets.caps if budgets is not None and (spend or admission.estimate) else ()
        ttl = budgets.ttl_ms() if budgets is not None and caps else []
        slots = plan.slots if member else ()
        return _Settlement(plan.token_windows, completion_tokens, caps, spend, ttl, slots, member, admission.admitted_at)

    def _retry_settle(self, due: _Settlement) -> None:
        # Only a lease that cannot have expired proves that no earlier try charged already.
        verify = bool(due.member) and (time.monotonic() - due.admitted_at) * 1000 + _VERIFY_MARGIN_MS < self._lease_ms
        store = self._store
        store.retry_in_background(
            "settle", lambda: store.settle(due.windows, due.tokens, due.caps, due.spend, due.ttl_ms, due.slots,
                                           due.member, verify),
            _SETTLE_DELAYS_S,
        )

    async def settle(self, admission: Admission, completion_tokens: int = 0, cost_micro_usd: int | None = None) -> None:
        """Charge the completion's tokens and the request's cost in place of its reservation, and free its
        parallel slots; once only. A failed try is retried in the background, never on the request's time."""
        due = self._settlement(admission, completion_tokens, cost_micro_usd)
        if due is None:
            return
        try:
            await self._store.settle(due.windows, due.tokens, due.caps, due.spend, due.ttl_ms, due.slots, due.member)
        except StorageUnavailable:
            self._retry_settle(due)

    def settle_soon(self, admission: Admission, completion_tokens: int = 0, cost_micro_usd: int | None = None) -> None:
        """`settle` without waiting for the store: the answer need not wait for it. It lands before the store's
        `close()` returns, after any call this process made before it and before any it makes after it; a try
        that fails is retried in the background like `settle`'s."""
        due = self._settlement(admission, completion_tokens, cost_micro_usd)
        if due is not None:
            self._store.settle_soon(due.windows, due.tokens, due.caps, due.spend, due.ttl_ms, due.slots, due.member,
                                    lambda: self._retry_settle(due))

    async def release(self, admission: Admission) -> None:
        """Free the request's parallel slots when it ends without a completion to charge."""
        await self.settle(admission)

    async def counters(self, scope: str) -> dict[str, Any]:
        """Current usage of every limit and budget of one scope, e.g. "user:alice", "group:eng", "global"."""
        kind, _, name = scope.partition(":")
        probe = Principal(key_id=name if kind == "key" else "", user=name if kind == "user" else "",
                          groups=(name,) if kind == "group" else ())
        windows: list[tuple[str, LimitRule, WindowSpec]] = []
        slots: list[tuple[LimitRule, SlotSpec]] = []
        for rule in self._rules:
            if rule.subject(probe) != scope:
                continue
            base = f"{KEY_PREFIX}{scope}:{rule.ident}"
            for label, short, rate in (("requests", "req", rule.requests), ("tokens", "tok", rule.tokens)):
                if rate is not None:
                    key = f"{base}:{short}:{rate[0]}/{rate[1]}"
                    windows.append((label, rule, WindowSpec(key, rate[0], rate[1])))
            if rule.max_parallel is not None:
                slots.append((rule, SlotSpec(f"{base}:par", rule.max_parallel)))
        budget_rules = [r for r in self._budgets if r.applies_to(probe) and r.subject(probe) == scope]
        budgets = budget_check(budget_rules, probe)
        specs = [w for _, _, w in windows]
        snap = await self._store.check_and_take(
            specs, [0] * len(specs), [s for _, s in slots], budgets.caps, "", self._lease_ms, take=False
        )
        out: dict[str, Any] = {"scope": scope, "windows": [], "parallel": [], "budgets": []}
        for (label, rule, spec), count in zip(windows, snap.windows, strict=True):
            state = _state(spec, count)
            out["windows"].append({
                "kind": label, "routes": list(rule.routes), "limit": spec.limit, "window_s": spec.window_ms / 1000,
                "used": state.used, "remaining": state.remaining, "reset_s": state.reset_s,
            })
        for (rule, slot), used in zip(slots, snap.slots_in_use, strict=True):
            out["parallel"].append({"routes": list(rule.routes), "limit": slot.limit, "in_use": used})
        for rule, span, used, held in zip(budgets.rules, budgets.periods, snap.spent, snap.reserved, strict=True):
            out["budgets"].append({
                "per": rule.per, "period": span.label, "usd": rule.cap_micro_usd / 1e6, "spent_usd": used / 1e6,
                "reserved_usd": held / 1e6, "resets_at": span.ends_at.isoformat(),
            })
        return out
