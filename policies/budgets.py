"""Spend budgets: USD per day or month for a user (each their own) or a group (shared by its members).

At admission a request reserves its estimated cost (its prompt and its max_tokens at the route's
prices) on every budget that applies, and is refused when the period's spend, the reservations of
the requests in flight and its own estimate would pass the budget. When it ends, its real cost
replaces the reservation; a reservation never settled (its process died) expires with its lease.
So concurrent requests never spend past a budget by more than their real cost exceeds their
estimates. Periods are UTC calendar days and months.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from policies.keys import Principal
from policies.limiter_storage import CapSpec, budget_blocks
from policies.schema import BudgetConfig

KEY_PREFIX = "lg:spend:"
_SLACK_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class BudgetRule:
    scope: str
    cap_micro_usd: int
    per: str

    def applies_to(self, principal: Principal) -> bool:
        return self.scope == "user" or self.scope.removeprefix("group:") in principal.groups

    def subject(self, principal: Principal) -> str:
        return f"user:{principal.user}" if self.scope == "user" else self.scope


@dataclass(frozen=True, slots=True)
class Period:
    label: str
    ends_at: datetime


def compile_budgets(configs: list[BudgetConfig]) -> list[BudgetRule]:
    return [BudgetRule(c.scope, round(c.usd * 1_000_000), c.per) for c in configs]


def period(per: str, now: datetime) -> Period:
    if per == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return Period(start.strftime("%Y-%m-%d"), start + timedelta(days=1))
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return Period(start.strftime("%Y-%m"), following)


def spend_key(subject: str, per: str, label: str) -> str:
    return f"{KEY_PREFIX}{subject}:{per}:{label}"


@dataclass(frozen=True, slots=True)
class BudgetCheck:
    """The budgets one principal is checked against in the current periods, with their storage keys."""

    rules: list[BudgetRule]
    subjects: list[str]
    periods: list[Period]
    caps: tuple[CapSpec, ...]
    valid_until: float
    # When each spend total may go: a day past its period's end, so a late charge still lands before the key goes.
    keep_until_ms: list[int]

    def ttl_ms(self) -> list[int]:
        now_ms = int(time.time() * 1000)
        return [until - now_ms for until in self.keep_until_ms]

    def refusal(self, spent: list[int], reserved: list[int], estimate: int) -> str | None:
        """Names the first budget that refuses the request and what remains of it."""
        rows = zip(self.rules, self.subjects, self.periods, spent, reserved, strict=True)
        for rule, subject, span, used, held in rows:
            cap = rule.cap_micro_usd
            if not budget_blocks(used, held, cap, estimate):
                continue
            in_flight = f" and {_usd(held)} reserved by requests in flight" if held else ""
            cost = "" if used >= cap else (
                f"; this request may cost up to {_usd(estimate)} (its prompt and max_tokens at the route's prices)"
            )
            return (
                f"Budget exceeded for {subject}: {_usd(used)} spent{in_flight} of {_usd(cap)} per {rule.per}, "
                f"{_usd(max(0, cap - used - held))} remains{cost}; it resets at {span.ends_at.isoformat()}."
            )
        return None

    def retry_after_s(self, spent: list[int], reserved: list[int], estimate: int) -> int:
        """The period's end, unless only the reservations of requests in flight stand in the way."""
        ends = []
        for rule, span, used, held in zip(self.rules, self.periods, spent, reserved, strict=True):
            cap = rule.cap_micro_usd
            if budget_blocks(used, held, cap, estimate) and budget_blocks(used, 0, cap, estimate):
                ends.append(span.ends_at.timestamp())
        return max(1, int(max(ends) - time.time()) + 1) if ends else 1


def _usd(micro: int) -> str:
    # Cents hide a budget of a few micro-dollars (tests, trials): show what is needed to read it.
    return f"${micro / 1e6:.2f}" if micro >= 10_000 or micro == 0 else f"${micro / 1e6:.6f}".rstrip("0")


def budget_check(rules: list[BudgetRule], principal: Principal, now: datetime | None = None) -> BudgetCheck:
    """Valid until the first of its periods ends; build a new one after that."""
    now = now or datetime.now(UTC)
    applied = [rule for rule in rules if rule.applies_to(principal)]
    subjects = [rule.subject(principal) for rule in applied]
    periods = [period(rule.per, now) for rule in applied]
    caps = tuple(
        CapSpec(spend_key(subject, rule.per, span.label), rule.cap_micro_usd)
        for rule, subject, span in zip(applied, subjects, periods, strict=True)
    )
    valid_until = min((p.ends_at.timestamp() for p in periods), default=float("inf"))
    keep_until_ms = [int(p.ends_at.timestamp() * 1000) + _SLACK_MS for p in periods]
    return BudgetCheck(applied, subjects, periods, caps, valid_until, keep_until_ms)
