"""The Redis store's one pipelined connection: batched calls stay exact, deferred settles land, failures are retried."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from policies.keys import Principal
from policies.limiter import Admission, Governor
from policies.limiter_storage import CounterStore, open_counter_store
from tests.policies.factory import make_policy

ALICE = Principal("k-alice", "alice", ("eng",))
BOB = Principal("k-bob", "bob", ("eng",))
BUDGET = [{"scope": "user", "usd": 1, "per": "day"}]
PARALLEL_AND_BUDGET = make_policy(limits=[{"scope": "user", "max_parallel": 1}], budgets=BUDGET)


async def _usage(url: str, scope: str = "user:alice", policy: Any = PARALLEL_AND_BUDGET) -> dict[str, Any]:
    store = open_counter_store(url)
    try:
        return await Governor(policy, store).counters(scope)
    finally:
        await store.close()


async def _warm(gov: Governor) -> None:
    """Connected and every script loaded, so what is sent to a frozen server is a call that runs later."""
    admission = await gov.admit(BOB, "chat-small", estimate_micro_usd=1)
    await gov.settle(admission, 1, 1)


async def test_concurrent_admissions_on_two_stores_stay_exact_and_deferred_settles_all_land(redis_url: str) -> None:
    policy = make_policy(limits=[{"scope": "user", "requests": "40/hour", "max_parallel": 1000}], budgets=BUDGET)
    stores = [open_counter_store(redis_url), open_counter_store(redis_url)]
    governors = [Governor(policy, s) for s in stores]
    results = await asyncio.gather(*(governors[i % 2].admit(ALICE, "chat-small", estimate_micro_usd=500)
                                     for i in range(200)))
    admitted = [(i, r) for i, r in enumerate(results) if r.allowed]
    assert len(admitted) == 40
    for i, admission in admitted:
        governors[i % 2].settle_soon(admission, cost_micro_usd=300)
    for s in stores:
        await s.close()
    usage = await _usage(redis_url, policy=policy)
    assert usage["windows"][0]["used"] == 40 and usage["parallel"][0]["in_use"] == 0
    assert (usage["budgets"][0]["spent_usd"], usage["budgets"][0]["reserved_usd"]) == (0.012, 0)


async def test_a_busy_process_holds_one_redis_connection(redis_server: Any, redis_url: str) -> None:
    server = redis.Redis(port=redis_server.port)
    before = len(server.client_list())
    store = open_counter_store(redis_url)
    gov = Governor(make_policy(limits=[{"scope": "user", "requests": "10000/hour", "max_parallel": 1000}]), store)
    results = await asyncio.gather(*(gov.admit(ALICE, "chat-small") for _ in range(500)))
    assert all(r.allowed for r in results)
    assert len(server.client_list()) == before + 1
    for admission in results:
        gov.settle_soon(admission)
    await store.close()
    assert (await _usage(redis_url))["parallel"][0]["in_use"] == 0


async def test_a_settle_not_waited_for_frees_the_slot_before_the_next_admission(store: CounterStore) -> None:
    # One connection, one batch at a time: Redis runs this process's calls in the order they were made.
    gov = Governor(PARALLEL_AND_BUDGET, store)
    for _ in range(20):
        admission = await gov.admit(ALICE, "chat-small", estimate_micro_usd=50_000)
        assert admission.allowed
        gov.settle_soon(admission, completion_tokens=3, cost_micro_usd=50_000)
    budget = (await gov.counters("user:alice"))["budgets"][0]
    assert (budget["spent_usd"], budget["reserved_usd"]) == (1.0, 0)
    assert (await gov.admit(ALICE, "chat-small", estimate_micro_usd=1)).code == "budget_exceeded"


async def test_a_deferred_settle_lands_before_close_returns(redis_url: str) -> None:
    store = open_counter_store(redis_url)
    gov = Governor(PARALLEL_AND_BUDGET, store)
    admission = await gov.admit(ALICE, "chat-small", estimate_micro_usd=5000)
    gov.settle_soon(admission, completion_tokens=20, cost_micro_usd=3000)
    await store.close()
    assert store.lost == 0
    usage = await _usage(redis_url)
    assert (usage["budgets"][0]["spent_usd"], usage["budgets"][0]["reserved_usd"]) == (0.003, 0)
    assert usage["parallel"][0]["in_use"] == 0


async def test_a_deferred_settle_that_timed_out_is_retried_and_charged_once(
    own_redis: Any, slow_store: CounterStore
) -> None:
    gov = Governor(PARALLEL_AND_BUDGET, slow_store)
    await _warm(gov)
    admission = await gov.admit(ALICE, "chat-small", estimate_micro_usd=5000)
    own_redis.pause()
    gov.settle_soon(admission, completion_tokens=20, cost_micro_usd=3000)
    await asyncio.sleep(0.8)  # the batch timed out, and the first retry went to the frozen server too
    own_redis.resume()
    async with asyncio.timeout(30):
        while (await _usage(own_redis.url))["budgets"][0]["spent_usd"] == 0:
            await asyncio.sleep(0.1)
    await slow_store.close(grace_s=30)
    usage = await _usage(own_redis.url)
    assert (usage["budgets"][0]["spent_usd"], usage["budgets"][0]["reserved_usd"]) == (0.003, 0)
    assert usage["parallel"][0]["in_use"] == 0
    assert slow_store.lost == 0 and slow_store.errors >= 1


async def test_deferred_settles_given_up_are_counted_lost(own_redis: Any) -> None:
    lost: list[str] = []
    errors: list[str] = []
    store = open_counter_store(own_redis.url, timeout_s=0.1, on_error=errors.append, on_lost=lost.append)
    gov = Governor(make_policy(budgets=BUDGET), store)
    admissions = [await gov.admit(ALICE, "chat-small", estimate_micro_usd=5000) for _ in range(3)]
    own_redis.stop()
    for admission in admissions:
        gov.settle_soon(admission, cost_micro_usd=3000)
    await store.close(grace_s=0)
    assert lost == ["settle"] * 3 and store.lost == 3 and len(errors) == 3


async def test_an_admission_cancelled_in_flight_gives_its_slot_back(own_redis: Any, slow_store: CounterStore) -> None:
    gov = Governor(PARALLEL_AND_BUDGET, slow_store)
    await _warm(gov)
    own_redis.pause()
    task = asyncio.get_running_loop().create_task(gov.admit(ALICE, "chat-small", estimate_micro_usd=800))
    await asyncio.sleep(0.05)  # sent, and waiting for its answer
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    own_redis.resume()
    # Far below parallel_lease_s (900 s): only the released slot lets it in this soon.
    async with asyncio.timeout(30):
        while not (admission := await gov.admit(ALICE, "chat-small", estimate_micro_usd=800)).allowed:
            await asyncio.sleep(0.1)
    await gov.settle(admission)
    usage = await _usage(own_redis.url)
    assert usage["parallel"][0]["in_use"] == 0 and usage["budgets"][0]["reserved_usd"] == 0


async def test_scripts_flushed_on_the_server_are_loaded_again(redis_server: Any, redis_url: str) -> None:
    store = open_counter_store(redis_url)
    gov = Governor(make_policy(limits=[{"scope": "user", "requests": "3/hour"}]), store)
    assert (await gov.admit(ALICE, "chat-small")).allowed
    redis.Redis(port=redis_server.port).script_flush()
    results: list[Admission] = await asyncio.gather(*(gov.admit(ALICE, "chat-small") for _ in range(4)))
    assert sum(r.allowed for r in results) == 2
    assert store.errors == 0
    await store.close()


async def test_a_call_redis_refuses_fails_alone_in_its_batch(redis_server: Any, redis_url: str) -> None:
    store = open_counter_store(redis_url)
    gov = Governor(PARALLEL_AND_BUDGET, store)
    # Another application wrote over alice's slot set: her script fails on Redis (WRONGTYPE), bob's beside it does not.
    redis.Redis(port=redis_server.port).set(gov.plan(ALICE, "chat-small").slots[0].key, "not a sorted set")
    alice, bob = await asyncio.gather(gov.admit(ALICE, "chat-small"), gov.admit(BOB, "chat-small"))
    assert alice.code == "limiter_unavailable" and "WRONGTYPE" in alice.message
    assert bob.allowed
    assert (await gov.admit(ALICE, "chat-small")).code == "limiter_unavailable"
    await store.close()
