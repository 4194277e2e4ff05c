"""Spend budgets: USD per day or month for a user (each their own) or a group (shared by its members).

A request is refused once the period's spend has reached the budget; the request that crosses it
is charged in full afterwards, because its cost is only known when it ends. Periods are UTC
calendar days and months.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from policies.keys import Principal
from policies.limiter_storage import CapSpec
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
    caps: list[CapSpec]
    valid_until: float

    def ttl_ms(self) -> list[int]:
        # Kept a day past the period's end so a late charge still lands before the key goes.
        now = time.time()
        return [int((p.ends_at.timestamp() - now) * 1000) + _SLACK_MS for p in self.periods]

    def refusal(self, spent: list[int]) -> str | None:
        for rule, subject, span, used in zip(self.rules, self.subjects, self.periods, spent, strict=True):
            if used >= rule.cap_micro_usd:
                return (
                    f"Budget exceeded for {subject}: ${used / 1e6:.2f} spent of ${rule.cap_micro_usd / 1e6:.2f} "
                    f"per {rule.per}; it resets at {span.ends_at.isoformat()}."
                )
        return None

    def retry_after_s(self, spent: list[int]) -> int:
        spans = zip(self.rules, self.periods, spent, strict=True)
        ends = [span.ends_at.timestamp() for rule, span, used in spans if used >= rule.cap_micro_usd]
        return max(1, int(max(ends) - time.time()) + 1) if ends else 1


def budget_check(rules: list[BudgetRule], principal: Principal, now: datetime | None = None) -> BudgetCheck:
    """Valid until the first of its periods ends; build a new one after that."""
    now = now or datetime.now(UTC)
    applied = [rule for rule in rules if rule.applies_to(principal)]
    subjects = [rule.subject(principal) for rule in applied]
    periods = [period(rule.per, now) for rule in applied]
    caps = [
        CapSpec(spend_key(subject, rule.per, span.label), rule.cap_micro_usd)
        for rule, subject, span in zip(applied, subjects, periods, strict=True)
    ]
    valid_until = min((p.ends_at.timestamp() for p in periods), default=float("inf"))
    return BudgetCheck(applied, subjects, periods, caps, valid_until)
