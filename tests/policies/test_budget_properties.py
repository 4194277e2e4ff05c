"""Budgets under any interleaving of admissions and settles: the spend never passes the cap."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from policies.keys import Principal
from policies.limiter import Admission, Governor
from policies.limiter_storage import open_counter_store
from tests.policies.factory import make_policy

ALICE = Principal("k-alice", "alice", ("eng",))
CAP = 10_000

# Each step admits a request with an estimate, or settles one in flight at a real cost of up to its estimate.
steps = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.integers(1, 4_000)),
        st.tuples(st.just("settle"), st.integers(0, 100), st.floats(0, 1)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_spend_and_reservations_never_pass_the_cap(plan: list[tuple]) -> None:
    asyncio.run(_run(plan))


async def _run(plan: list[tuple]) -> None:
    gov = Governor(make_policy(budgets=[{"scope": "user", "usd": CAP / 1e6, "per": "day"}]), open_counter_store("memory://"))
    in_flight: list[Admission] = []
    expected_spent = 0
    for step in plan:
        if step[0] == "admit":
            before = (await gov.counters("user:alice"))["budgets"][0]
            room = CAP - round(before["spent_usd"] * 1e6) - round(before["reserved_usd"] * 1e6)
            admission = await gov.admit(ALICE, "chat-small", estimate_micro_usd=step[1])
            assert admission.allowed == (step[1] <= room)
            if admission.allowed:
                in_flight.append(admission)
            else:
                assert admission.code == "budget_exceeded" and f"${max(0, room) / 1e6:f}".rstrip("0") in admission.message
        elif in_flight:
            admission = in_flight.pop(step[1] % len(in_flight))
            cost = int(admission.estimate * step[2])
            expected_spent += cost
            await gov.settle(admission, cost_micro_usd=cost)
        budget = (await gov.counters("user:alice"))["budgets"][0]
        spent, reserved = round(budget["spent_usd"] * 1e6), round(budget["reserved_usd"] * 1e6)
        assert spent == expected_spent
        assert reserved == sum(a.estimate for a in in_flight)
        assert spent + reserved <= CAP
