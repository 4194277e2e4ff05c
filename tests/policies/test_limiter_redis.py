"""What only a shared Redis shows: exact counting across stores, outages, and slots of dead processes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from policies.keys import Principal
from policies.limiter import Governor
from policies.limiter_storage import RedisCounterStore, open_counter_store
from tests.policies.factory import make_policy

ALICE = Principal("k-alice", "alice", ("eng",))


async def test_two_governors_on_one_redis_admit_exactly_the_limit(redis_url: str) -> None:
    limits = [{"scope": "user", "requests": "25/hour"}, {"scope": "global", "tokens": "1000000/day"}]
    policy = make_policy(limits=limits)
    stores = [open_counter_store(redis_url), open_counter_store(redis_url)]
    governors = [Governor(policy, s) for s in stores]
    results = await asyncio.gather(*(governors[i % 2].admit(ALICE, "chat-small", 10) for i in range(80)))
    assert sum(r.allowed for r in results) == 25
    usage = await governors[0].counters("global")
    assert usage["windows"][0]["used"] == 250
    for s in stores:
        await s.close()


async def test_two_governors_on_one_redis_never_reserve_past_a_budget(redis_url: str) -> None:
    policy = make_policy(budgets=[{"scope": "group:eng", "usd": 0.0035, "per": "day"}])
    stores = [open_counter_store(redis_url), open_counter_store(redis_url)]
    governors = [Governor(policy, s) for s in stores]
    bob = Principal("k-bob", "bob", ("eng",))
    results = await asyncio.gather(*(governors[i % 2].admit((ALICE, bob)[i % 3 % 2], "chat-small", estimate_micro_usd=1000)
                                     for i in range(60)))
    admitted = [(i, r) for i, r in enumerate(results) if r.allowed]
    assert len(admitted) == 3
    await asyncio.gather(*(governors[i % 2].settle(r, cost_micro_usd=1100) for i, r in admitted))
    budget = (await governors[0].counters("group:eng"))["budgets"][0]
    assert (budget["spent_usd"], budget["reserved_usd"]) == (0.0033, 0)
    for s in stores:
        await s.close()


async def test_a_burst_waits_for_pooled_connections_instead_of_failing(redis_url: str) -> None:
    store = open_counter_store(redis_url, timeout_s=2.0, max_connections=8)
    gov = Governor(make_policy(limits=[{"scope": "user", "requests": "1000/hour", "max_parallel": 1000}]), store)
    results = await asyncio.gather(*(gov.admit(ALICE, "chat-small") for _ in range(500)))
    assert [r.code for r in results if not r.allowed] == []
    assert store.errors == 0
    await asyncio.gather(*(gov.release(r) for r in results))
    assert (await gov.counters("user:alice"))["parallel"][0]["in_use"] == 0
    await store.close()


async def test_slots_of_a_process_that_died_expire(redis_url: str) -> None:
    policy = make_policy(
        limiter={"storage": redis_url, "parallel_lease_s": 0.3}, limits=[{"scope": "user", "max_parallel": 1}]
    )
    dead = open_counter_store(redis_url)
    assert (await Governor(policy, dead).admit(ALICE, "chat-small")).allowed
    await dead.close()
    live = open_counter_store(redis_url)
    gov = Governor(policy, live)
    assert not (await gov.admit(ALICE, "chat-small")).allowed
    await asyncio.sleep(0.4)
    assert (await gov.admit(ALICE, "chat-small")).allowed
    await live.close()


@pytest.mark.parametrize("on_error", ["deny", "allow"])
async def test_outage_follows_on_error_then_limits_resume(
    own_redis: Any, on_error: str, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []
    store = open_counter_store(own_redis.url, timeout_s=1.0, on_error=events.append)
    assert isinstance(store, RedisCounterStore)
    policy = make_policy(
        limiter={"storage": own_redis.url, "on_error": on_error}, limits=[{"scope": "user", "requests": "2/hour"}]
    )
    gov = Governor(policy, store)
    assert (await gov.admit(ALICE, "chat-small")).allowed

    own_redis.stop()
    async with asyncio.timeout(3):
        during = [await gov.admit(ALICE, "chat-small") for _ in range(3)]
    if on_error == "deny":
        assert all(not a.allowed and a.code == "limiter_unavailable" for a in during)
    else:
        assert all(a.allowed and a.degraded for a in during)
    assert store.errors == 3 and len(events) == 3
    assert next(r.message for r in caplog.records if r.levelno == logging.WARNING).startswith("limiter storage")

    own_redis.start()
    # The restarted server kept no data, so the full limit is available again, and enforced.
    assert [(await gov.admit(ALICE, "chat-small")).allowed for _ in range(3)] == [True, True, False]
    await store.close()


async def test_a_hung_redis_is_answered_within_the_timeout(own_redis: Any) -> None:
    store = open_counter_store(own_redis.url, timeout_s=0.3)
    gov = Governor(make_policy(limits=[{"scope": "user", "requests": "5/hour"}]), store)
    assert (await gov.admit(ALICE, "chat-small")).allowed
    own_redis.pause()
    try:
        async with asyncio.timeout(5):
            refused = await gov.admit(ALICE, "chat-small")
        assert refused.code == "limiter_unavailable" and "TimeoutError" in refused.message
    finally:
        own_redis.resume()
    assert (await gov.admit(ALICE, "chat-small")).allowed
    await store.close()
