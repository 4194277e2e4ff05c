"""Limits, parallel slots and budgets; every test runs on the memory store and on a real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

from policies.keys import Principal
from policies.limiter import Governor, format_duration, retry_wait_ms
from policies.limiter_storage import CounterStore, WindowCount, WindowSpec, window_blocks
from tests.policies.factory import make_policy

ALICE = Principal("k-alice", "alice", ("eng",))
ALICE_2ND_KEY = Principal("k-alice-2", "alice", ("eng",))
BOB = Principal("k-bob", "bob", ("eng",))
CAROL = Principal("k-carol", "carol", ("ops",))


def governor(store: CounterStore, **sections: Any) -> Governor:
    return Governor(make_policy(**sections), store)


async def admitted(gov: Governor, principal: Principal, route: str = "chat-small", times: int = 1) -> int:
    count = 0
    for _ in range(times):
        count += (await gov.admit(principal, route)).allowed
    return count


async def test_request_limit_refuses_the_next_request_with_headers(store: CounterStore) -> None:
    gov = governor(store, limits=[{"scope": "user", "requests": "3/hour"}])
    first = await gov.admit(ALICE, "chat-small")
    assert first.headers()["x-ratelimit-limit-requests"] == "3"
    assert first.headers()["x-ratelimit-remaining-requests"] == "2"
    assert await admitted(gov, ALICE, times=2) == 2
    refused = await gov.admit(ALICE, "chat-small")
    assert not refused.allowed
    assert refused.code == "rate_limit_exceeded"
    assert "user:alice" in refused.message and "3 requests per 1h0m0s" in refused.message
    assert refused.retry_after_s is not None and 1 <= refused.retry_after_s <= 3600
    assert refused.headers()["retry-after"] == str(refused.retry_after_s)
    assert refused.headers()["x-ratelimit-remaining-requests"] == "0"


async def test_scopes_count_per_user_per_key_per_group_and_globally(store: CounterStore) -> None:
    gov = governor(store, limits=[{"scope": "user", "requests": "2/hour"}])
    assert await admitted(gov, ALICE, times=2) + await admitted(gov, ALICE_2ND_KEY) == 2
    assert await admitted(gov, BOB, times=2) == 2

    gov = governor(store, limits=[{"scope": "key", "requests": "1/day"}])
    assert await admitted(gov, ALICE) + await admitted(gov, ALICE_2ND_KEY) + await admitted(gov, ALICE) == 2

    gov = governor(store, limits=[{"scope": "group:eng", "requests": "3/day"}])
    assert await admitted(gov, ALICE, times=2) + await admitted(gov, BOB, times=2) == 3
    assert await admitted(gov, CAROL, times=5) == 5

    gov = governor(store, limits=[{"scope": "global", "requests": "4/day"}])
    assert await admitted(gov, ALICE, times=2) + await admitted(gov, CAROL, times=3) == 4


async def test_route_globs_select_which_requests_a_limit_counts(store: CounterStore) -> None:
    gov = governor(store, limits=[
        {"scope": "user", "requests": "1/hour", "routes": ["chat-*"]},
        {"scope": "route:embed", "requests": "2/hour"},
    ])
    assert await admitted(gov, ALICE, "chat-small", times=2) == 1
    assert await admitted(gov, ALICE, "chat-large") == 0
    assert await admitted(gov, ALICE, "embed", times=2) + await admitted(gov, BOB, "embed", times=2) == 2


async def test_a_refusal_consumes_no_other_limit(store: CounterStore) -> None:
    gov = governor(store, limits=[
        {"scope": "user", "requests": "10/hour"},
        {"scope": "group:eng", "requests": "2/hour"},
    ])
    assert await admitted(gov, ALICE, times=5) == 2
    usage = await gov.counters("user:alice")
    assert usage["windows"][0]["used"] == 2


async def test_prompt_tokens_checked_and_completion_tokens_charged(store: CounterStore) -> None:
    gov = governor(store, limits=[{"scope": "user", "tokens": "1000/hour"}])
    first = await gov.admit(ALICE, "chat-small", 400)
    assert first.allowed and first.headers()["x-ratelimit-remaining-tokens"] == "600"
    await gov.settle(first, completion_tokens=300)
    refused = await gov.admit(ALICE, "chat-small", 400)
    assert not refused.allowed and refused.code == "rate_limit_exceeded"
    assert refused.headers()["x-ratelimit-remaining-tokens"] == "300"
    assert (await gov.admit(ALICE, "chat-small", 300)).allowed
    assert not (await gov.admit(ALICE, "chat-small", 0)).allowed

    too_big = await gov.admit(BOB, "chat-small", 5000)
    assert too_big.code == "request_too_large" and too_big.retry_after_s is None


async def test_max_parallel_holds_slots_until_settled(store: CounterStore) -> None:
    gov = governor(store, limits=[{"scope": "user", "max_parallel": 2}])
    one, two = await gov.admit(ALICE, "chat-small"), await gov.admit(ALICE, "chat-small")
    third = await gov.admit(ALICE, "chat-small")
    assert one.allowed and two.allowed and not third.allowed
    assert "at most 2 at once" in third.message
    assert (await gov.admit(BOB, "chat-small")).allowed
    await gov.release(one)
    await gov.release(one)
    assert (await gov.admit(ALICE, "chat-small")).allowed
    assert not (await gov.admit(ALICE, "chat-small")).allowed
    assert (await gov.counters("user:alice"))["parallel"][0]["in_use"] == 2


async def test_user_budget_refuses_once_spent(store: CounterStore) -> None:
    gov = governor(store, budgets=[{"scope": "user", "usd": 1, "per": "day"}])
    first = await gov.admit(ALICE, "chat-small")
    await gov.settle(first, completion_tokens=10, cost_micro_usd=1_200_000)
    refused = await gov.admit(ALICE, "chat-small")
    assert not refused.allowed and refused.code == "budget_exceeded"
    assert "user:alice: $1.20 spent of $1.00 per day" in refused.message
    assert refused.retry_after_s is not None and refused.retry_after_s <= 86_400
    assert (await gov.admit(BOB, "chat-small")).allowed


async def test_group_budget_is_shared_by_its_members(store: CounterStore) -> None:
    gov = governor(store, budgets=[{"scope": "group:eng", "usd": 2, "per": "month"}])
    await gov.settle(await gov.admit(ALICE, "chat-small"), cost_micro_usd=1_200_000)
    await gov.settle(await gov.admit(BOB, "chat-small"), cost_micro_usd=900_000)
    assert (await gov.admit(ALICE, "chat-small")).code == "budget_exceeded"
    assert (await gov.admit(CAROL, "chat-small")).allowed
    usage = await gov.counters("group:eng")
    assert usage["budgets"] == [{
        "per": "month", "period": usage["budgets"][0]["period"], "usd": 2.0, "spent_usd": 2.1,
        "reserved_usd": 0.0, "resets_at": usage["budgets"][0]["resets_at"],
    }]


async def test_counters_survive_a_new_policy_version(store: CounterStore) -> None:
    limits = [{"scope": "user", "requests": "2/hour"}]
    assert await admitted(governor(store, limits=limits), ALICE, times=2) == 2
    reloaded = governor(store, limits=limits, roles={"r": {"models": ["*"]}})
    assert await admitted(reloaded, ALICE) == 0


async def test_no_limits_means_no_storage_round_trip(store: CounterStore) -> None:
    admission = await governor(store).admit(ALICE, "chat-small", 10_000)
    assert admission.allowed and admission.headers() == {}


def test_reset_durations_use_openai_format() -> None:
    assert format_duration(0.02) == "20ms"
    assert format_duration(1) == "1s"
    assert format_duration(360) == "6m0s"
    assert format_duration(3723) == "1h2m3s"


def test_retry_after_is_the_first_moment_the_window_admits_again() -> None:
    spec = WindowSpec("k", limit=10, window_ms=60_000)
    for count, amount in [((10, 5, 30_000), 1), ((0, 10, 10_000), 1), ((12, 3, 1_000), 4), ((8, 9, 59_000), 2)]:
        assert window_blocks(count, spec.limit, spec.window_ms, amount)
        wait = retry_wait_ms(spec, count, amount)
        assert not window_blocks(_slide(count, wait, spec.window_ms), spec.limit, spec.window_ms, amount)
        assert window_blocks(_slide(count, wait - 2, spec.window_ms), spec.limit, spec.window_ms, amount)


def _slide(count: WindowCount, ms: int, window_ms: int) -> WindowCount:
    previous, current, elapsed = count
    elapsed += ms
    if elapsed >= window_ms:
        return (current if elapsed < 2 * window_ms else 0, 0, elapsed % window_ms)
    return (previous, current, elapsed)


async def test_concurrent_requests_cannot_spend_past_a_budget(store: CounterStore) -> None:
    # Room for three estimates of $0.001 in $0.0035: the fourth is refused while the three are in flight.
    gov = governor(store, budgets=[{"scope": "user", "usd": 0.0035, "per": "day"}])
    results = await asyncio.gather(*(gov.admit(ALICE, "chat-small", 10, estimate_micro_usd=1000) for _ in range(20)))
    admitted = [r for r in results if r.allowed]
    assert len(admitted) == 3
    refused = next(r for r in results if not r.allowed)
    assert refused.code == "budget_exceeded"
    assert "user:alice: $0.00 spent and $0.003 reserved by requests in flight of $0.0035 per day" in refused.message
    assert "$0.0005 remains" in refused.message and "may cost up to $0.001" in refused.message
    assert refused.retry_after_s == 1
    await asyncio.gather(*(gov.settle(a, cost_micro_usd=1000) for a in admitted))
    budget = (await gov.counters("user:alice"))["budgets"][0]
    assert budget["spent_usd"] == 0.003 and budget["reserved_usd"] == 0
    spent_up = await gov.admit(ALICE, "chat-small", 10, estimate_micro_usd=1000)
    assert spent_up.code == "budget_exceeded" and spent_up.retry_after_s is not None and spent_up.retry_after_s > 1


async def test_settle_replaces_the_reservation_by_the_real_cost(store: CounterStore) -> None:
    gov = governor(store, budgets=[{"scope": "group:eng", "usd": 0.001, "per": "month"}])
    first = await gov.admit(ALICE, "chat-small", estimate_micro_usd=600)
    assert first.allowed
    assert not (await gov.admit(BOB, "chat-small", estimate_micro_usd=600)).allowed
    await gov.settle(first, completion_tokens=5, cost_micro_usd=100)
    second = await gov.admit(BOB, "chat-small", estimate_micro_usd=600)
    assert second.allowed
    budget = (await gov.counters("group:eng"))["budgets"][0]
    assert (budget["spent_usd"], budget["reserved_usd"]) == (0.0001, 0.0006)
    await gov.release(second)
    assert (await gov.counters("group:eng"))["budgets"][0]["reserved_usd"] == 0


async def test_a_reservation_never_settled_expires_with_its_lease(store: CounterStore) -> None:
    gov = governor(store, limiter={"parallel_lease_s": 0.3}, budgets=[{"scope": "user", "usd": 0.001, "per": "day"}])
    assert (await gov.admit(ALICE, "chat-small", estimate_micro_usd=800)).allowed
    assert not (await gov.admit(ALICE, "chat-small", estimate_micro_usd=800)).allowed
    await asyncio.sleep(0.4)
    assert (await gov.admit(ALICE, "chat-small", estimate_micro_usd=800)).allowed
