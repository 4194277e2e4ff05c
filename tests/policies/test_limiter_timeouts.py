"""A Redis that answers too late: the script may have run after we gave up, so nothing may stay taken or uncharged.

The server is frozen with SIGSTOP (it keeps its sockets, like a hung host): what we sent waits in its socket
buffers and runs when it resumes, after our side timed out, in whatever order the server reads its sockets.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from policies.keys import Principal
from policies.limiter import Admission, Governor
from policies.limiter_storage import CapSpec, CounterStore, SlotSpec, open_counter_store, redact_dsn
from tests.policies.factory import make_policy
from tests.redis_server import free_port

ALICE = Principal("k-alice", "alice", ("eng",))
BOB = Principal("k-bob", "bob", ("eng",))
BUDGET = [{"scope": "user", "usd": 1, "per": "day"}]


async def _warm(gov: Governor, store: CounterStore) -> None:
    """Pooled connections and every script loaded, so a call sent to the frozen server is one that runs later."""
    admissions = await asyncio.gather(*(gov.admit(BOB, "chat-small") for _ in range(4)))
    await asyncio.gather(*(gov.settle(a, 1, 1) for a in admissions))
    await store.release([], [], "warm-up", 1000)


async def _admit_until_allowed(gov: Governor, **kwargs: Any) -> Admission:
    # Far below parallel_lease_s (900 s): only a released slot or reservation lets it in this soon.
    async with asyncio.timeout(30):
        while not (admission := await gov.admit(ALICE, "chat-small", **kwargs)).allowed:
            await asyncio.sleep(0.1)
    return admission


async def _usage(url: str, scope: str = "user:alice") -> dict[str, Any]:
    store = open_counter_store(url)
    try:
        return await Governor(make_policy(limits=[{"scope": "user", "max_parallel": 1}], budgets=BUDGET),
                              store).counters(scope)
    finally:
        await store.close()


async def test_an_admission_that_timed_out_leaves_no_slot_taken(own_redis: Any, slow_store: CounterStore) -> None:
    gov = Governor(make_policy(limits=[{"scope": "user", "max_parallel": 1}]), slow_store)
    await _warm(gov, slow_store)
    own_redis.pause()
    async with asyncio.timeout(2):
        refused = await gov.admit(ALICE, "chat-small")
    assert refused.code == "limiter_unavailable"
    await asyncio.sleep(0.3)  # the first compensating release is sent to the frozen server too
    own_redis.resume()
    admitted = await _admit_until_allowed(gov)
    assert not (await gov.admit(ALICE, "chat-small")).allowed
    await gov.release(admitted)
    assert (await _usage(own_redis.url))["parallel"][0]["in_use"] == 0
    assert slow_store.lost == 0


async def test_a_reservation_taken_by_a_timed_out_admission_is_given_back(
    own_redis: Any, slow_store: CounterStore
) -> None:
    gov = Governor(make_policy(budgets=[{"scope": "user", "usd": 0.001, "per": "day"}]), slow_store)
    await _warm(gov, slow_store)
    own_redis.pause()
    refused = await gov.admit(ALICE, "chat-small", estimate_micro_usd=800)
    assert refused.code == "limiter_unavailable"
    await asyncio.sleep(0.3)
    own_redis.resume()
    await _admit_until_allowed(gov, estimate_micro_usd=800)
    assert (await _usage(own_redis.url))["budgets"][0]["reserved_usd"] == 0.0008


async def test_an_admission_that_runs_after_its_release_takes_nothing(redis_url: str) -> None:
    # The order a server (or a proxy in front of it) reads two connections in is not the order they were sent in.
    store = open_counter_store(redis_url)
    slots, caps = [SlotSpec("lg:rate:test:par", 1)], [CapSpec("lg:spend:test", 1000)]
    await store.release(slots, caps, "late-1", 60_000)
    late = await store.check_and_take([], [], slots, caps, "late-1", 60_000, estimate=800)
    assert late.allowed
    after = await store.check_and_take([], [], slots, caps, "next-1", 60_000, estimate=800)
    assert after.allowed and after.slots_in_use == [0] and after.reserved == [0]
    await store.close()


async def test_a_settle_that_timed_out_is_retried_and_charged_once(own_redis: Any) -> None:
    store = open_counter_store(own_redis.url, timeout_s=0.1)
    gov = Governor(make_policy(limits=[{"scope": "user", "max_parallel": 1}], budgets=BUDGET), store)
    await _warm(gov, store)
    admission = await gov.admit(ALICE, "chat-small", estimate_micro_usd=5000)
    assert admission.allowed
    own_redis.pause()
    async with asyncio.timeout(2):
        await gov.settle(admission, completion_tokens=20, cost_micro_usd=3000)
    await asyncio.sleep(0.8)  # the first retry is sent to the frozen server too
    own_redis.resume()
    async with asyncio.timeout(30):
        while (await _usage(own_redis.url))["budgets"][0]["spent_usd"] == 0:
            await asyncio.sleep(0.1)
    await store.close(grace_s=30)
    usage = await _usage(own_redis.url)
    assert usage["budgets"][0]["spent_usd"] == 0.003 and usage["budgets"][0]["reserved_usd"] == 0
    assert usage["parallel"][0]["in_use"] == 0
    assert store.lost == 0


async def test_a_request_let_through_during_an_outage_is_still_charged(own_redis: Any, slow_store: CounterStore) -> None:
    policy = make_policy(limiter={"on_error": "allow"}, limits=[{"scope": "user", "max_parallel": 1}], budgets=BUDGET)
    gov = Governor(policy, slow_store)
    await _warm(gov, slow_store)
    own_redis.pause()
    unchecked = await gov.admit(ALICE, "chat-small", estimate_micro_usd=5000)
    assert unchecked.allowed and unchecked.degraded
    await asyncio.sleep(0.3)
    own_redis.resume()
    await gov.settle(unchecked, completion_tokens=20, cost_micro_usd=3000)
    async with asyncio.timeout(30):
        while (usage := await _usage(own_redis.url))["parallel"][0]["in_use"] or usage["budgets"][0]["reserved_usd"]:
            await asyncio.sleep(0.1)
    assert usage["budgets"][0]["spent_usd"] == 0.003


async def test_settles_given_up_are_counted_and_logged(own_redis: Any, caplog: pytest.LogCaptureFixture) -> None:
    lost: list[str] = []
    store = open_counter_store(own_redis.url, timeout_s=0.1, on_lost=lost.append)
    gov = Governor(make_policy(budgets=BUDGET), store)
    admission = await gov.admit(ALICE, "chat-small", estimate_micro_usd=5000)
    own_redis.stop()
    await gov.settle(admission, cost_micro_usd=3000)
    await store.close(grace_s=0)
    assert lost == ["settle"] and store.lost == 1
    assert any("limiter settle not recorded" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_dsn_credentials_are_redacted() -> None:
    assert redact_dsn("redis://:pa55word@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact_dsn("rediss://gateway:pa55word@cache:6380/1") == "rediss://:***@cache:6380/1"
    assert redact_dsn("redis://cache:6379/0?password=pa55word&db=2") == "redis://cache:6379/0?password=***&db=2"
    assert redact_dsn("redis://cache:6379/0") == "redis://cache:6379/0"


async def test_the_redis_password_never_reaches_a_log_line_or_an_error(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    dsn = f"redis://gateway-user:Sup3r-Secret-pw@127.0.0.1:{port}/0"
    store = open_counter_store(dsn, timeout_s=0.2)
    gov = Governor(make_policy(limiter={"storage": dsn}, limits=[{"scope": "user", "max_parallel": 1}]), store)
    with caplog.at_level(logging.DEBUG):
        refused = await gov.admit(ALICE, "chat-small")
        await store.close(grace_s=0)
    assert refused.code == "limiter_unavailable"
    shown = caplog.text + refused.message + store.uri
    assert f"redis://:***@127.0.0.1:{port}/0" in caplog.text
    assert "Sup3r-Secret-pw" not in shown and "gateway-user" not in shown


async def test_a_redis_that_refuses_connections_gets_no_compensations(own_redis: Any) -> None:
    # Nothing was sent, so nothing is voided: an outage does not pile up background work.
    store = open_counter_store(own_redis.url, timeout_s=0.2)
    gov = Governor(make_policy(limits=[{"scope": "user", "max_parallel": 1}]), store)
    own_redis.stop()
    refused = [await gov.admit(ALICE, "chat-small") for _ in range(5)]
    assert all(r.code == "limiter_unavailable" for r in refused)
    await store.close(grace_s=0)
    assert store.lost == 0
