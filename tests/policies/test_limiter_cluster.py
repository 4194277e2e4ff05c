"""The limiter on a real 3-node Redis Cluster: exact counts across gateway processes, a moved slot, a node down.

Windows are an hour long: a sliding window read just after its fixed window rolled over weighs the previous one in,
so a minute-long window made exact counts depend on where the minute boundary fell during the test.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from policies.keys import Principal
from policies.limiter import Governor
from policies.limiter_cluster import KEY_TAG, ClusterCounterStore
from policies.limiter_storage import open_counter_store
from tests.policies.factory import make_policy
from tests.redis_server import RedisCluster, cluster_url, free_port, own_cluster, redis_cluster

__all__ = ["cluster_url", "own_cluster", "redis_cluster"]  # the fixtures, for pytest

ALICE = Principal("k-alice", "alice", ("eng",))
BOB = Principal("k-bob", "bob", ("eng",))
ROOT = Path(__file__).resolve().parents[2]
SLOT = key_slot(KEY_TAG)


async def _two_gateways(storage: str, spec: dict[str, Any]) -> list[dict[str, int]]:
    """Runs tests/policies/limiter_process.py twice at once, each its own process with its own store."""
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.policies.limiter_process", storage, json.dumps(spec), cwd=ROOT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for process in processes:
        assert process.stdout is not None
        assert await asyncio.wait_for(process.stdout.readline(), 120) == b"ready\n"
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        await process.stdin.drain()
    outputs = [await asyncio.wait_for(process.communicate(), 120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    return [json.loads(stdout) for stdout, _ in outputs]


async def test_two_gateway_processes_admit_exactly_the_limit_and_settle_tokens(
    redis_cluster: RedisCluster, cluster_url: str
) -> None:
    limits = [{"scope": "global", "requests": "40/hour"}, {"scope": "user", "tokens": "1000000/day"}]
    spec = {"policy": {"limits": limits}, "requests": 60, "prompt_tokens": 10, "estimate": 0, "completion_tokens": 4,
            "cost": 0}
    results = await _two_gateways(cluster_url, spec)
    assert sum(r["admitted"] for r in results) == 40
    assert [(r["errors"], r["lost"]) for r in results] == [(0, 0), (0, 0)]
    store = open_counter_store(cluster_url)
    gov = Governor(make_policy(limits=limits), store)
    assert (await gov.counters("global"))["windows"][0]["used"] == 40
    # Prompt and completion tokens of the admitted requests only, wherever they were admitted and settled.
    tokens = [(await gov.counters(f"user:{who}"))["windows"][0]["used"] for who in ("alice", "bob")]
    assert sum(tokens) == 40 * (10 + 4)
    await store.close()
    # One hash tag: every key of the limiter on the node that serves its slot, none elsewhere.
    owner = redis_cluster.owner(KEY_TAG)
    keys = redis_cluster.client(owner).keys()
    assert keys and all(key.startswith(KEY_TAG) for key in keys)
    assert [redis_cluster.client(port).dbsize() for port in redis_cluster.ports if port != owner] == [0, 0]


async def test_two_gateway_processes_never_reserve_past_a_budget(cluster_url: str) -> None:
    budgets = [{"scope": "group:eng", "usd": 0.0035, "per": "day"}]
    spec = {"policy": {"budgets": budgets}, "requests": 30, "prompt_tokens": 0, "estimate": 1000,
            "completion_tokens": 0, "cost": 1100}
    results = await _two_gateways(cluster_url, spec)
    assert sum(r["admitted"] for r in results) == 3
    store = open_counter_store(cluster_url)
    budget = (await Governor(make_policy(budgets=budgets), store).counters("group:eng"))["budgets"][0]
    assert (budget["spent_usd"], budget["reserved_usd"]) == (0.0033, 0)
    await store.close()


async def test_parallel_slots_are_freed_by_settle_on_a_cluster(cluster_url: str) -> None:
    store = open_counter_store(cluster_url)
    gov = Governor(make_policy(limits=[{"scope": "user", "max_parallel": 2}]), store)
    first, second, third = [await gov.admit(ALICE, "chat-small") for _ in range(3)]
    assert (first.allowed, second.allowed, third.allowed, third.code) == (True, True, False, "rate_limit_exceeded")
    gov.settle_soon(first)
    assert (await gov.admit(ALICE, "chat-small")).allowed
    await store.close()
    assert store.errors == 0


def _other(cluster: RedisCluster, port: int) -> int:
    return next(p for p in cluster.ports if p != port)


async def test_a_moved_slot_is_followed_and_its_counts_move_with_it(redis_cluster: RedisCluster, cluster_url: str) -> None:
    store = open_counter_store(cluster_url)
    gov = Governor(make_policy(limits=[{"scope": "user", "requests": "25/hour"}]), store)
    assert all([(await gov.admit(ALICE, "chat-small")).allowed for _ in range(10)])
    source = redis_cluster.owner(KEY_TAG)
    target = _other(redis_cluster, source)
    redis_cluster.move(SLOT, source, target)
    assert redis_cluster.owner(KEY_TAG) == target
    results = [await gov.admit(ALICE, "chat-small") for _ in range(30)]
    assert sum(r.allowed for r in results) == 15
    assert store.errors == 0
    assert redis_cluster.client(source).dbsize() == 0
    assert redis_cluster.client(target).dbsize() > 0
    await store.close()


async def test_a_call_made_while_the_slot_moves_waits_for_the_move(redis_cluster: RedisCluster, cluster_url: str) -> None:
    store = open_counter_store(cluster_url, timeout_s=30.0)
    gov = Governor(make_policy(limits=[{"scope": "user", "requests": "5/hour"}]), store)
    assert (await gov.admit(ALICE, "chat-small")).allowed
    source = redis_cluster.owner(KEY_TAG)
    target = _other(redis_cluster, source)
    redis_cluster.begin_move(SLOT, source, target)
    # alice's counter is still on the source, bob has none yet (ASK, then TRYAGAIN on the target): both wait.
    pending = [asyncio.ensure_future(gov.admit(who, "chat-small")) for who in (ALICE, BOB)]
    done, _ = await asyncio.wait(pending, timeout=0.5)
    assert not done
    redis_cluster.migrate_keys(SLOT, source, target)
    redis_cluster.finish_move(SLOT, target)
    assert [a.allowed for a in await asyncio.wait_for(asyncio.gather(*pending), 60)] == [True, True]
    usage = await gov.counters("user:alice")
    assert usage["windows"][0]["used"] == 2
    assert store.errors == 0
    await store.close()


async def test_a_call_whose_keys_moved_already_follows_ask(redis_cluster: RedisCluster, cluster_url: str) -> None:
    store = open_counter_store(cluster_url)
    gov = Governor(make_policy(limits=[{"scope": "user", "tokens": "1000/hour", "max_parallel": 1}]), store)
    admission = await gov.admit(ALICE, "chat-small", prompt_tokens=10)
    assert admission.allowed
    source = redis_cluster.owner(KEY_TAG)
    target = _other(redis_cluster, source)
    redis_cluster.begin_move(SLOT, source, target)
    redis_cluster.migrate_keys(SLOT, source, target)
    # The source answers ASK: the target serves the settle (its keys are all there) before the move ends.
    await gov.settle(admission, completion_tokens=5)
    assert store.errors == 0
    peek = redis.Redis(port=target, single_connection_client=True)
    peek.execute_command("ASKING")
    window = peek.hgetall(KEY_TAG + gov.plan(ALICE, "chat-small").token_windows[0].key.encode())
    peek.close()
    assert int(window[b"c"]) == 15
    redis_cluster.finish_move(SLOT, target)
    assert (await gov.admit(ALICE, "chat-small", prompt_tokens=10)).allowed
    await store.close()


async def test_the_owner_down_follows_on_error_then_limits_resume(own_cluster: RedisCluster) -> None:
    store = open_counter_store(own_cluster.url, timeout_s=1.0)
    limits = [{"scope": "user", "requests": "3/hour"}]
    deny = Governor(make_policy(limits=limits), store)
    allow = Governor(make_policy(limits=limits, limiter={"on_error": "allow"}), store)
    assert (await deny.admit(ALICE, "chat-small")).allowed
    owner = own_cluster.owner(KEY_TAG)
    own_cluster.stop_node(owner)
    refused = await deny.admit(ALICE, "chat-small")
    assert (refused.allowed, refused.code) == (False, "limiter_unavailable")
    let_through = await allow.admit(ALICE, "chat-small")
    assert (let_through.allowed, let_through.degraded) == (True, True)
    assert store.errors >= 2
    own_cluster.start_node(owner)
    own_cluster.wait_ok()
    for _ in range(200):
        back = await deny.admit(ALICE, "chat-small")
        if back.code != "limiter_unavailable":
            break
        await asyncio.sleep(0.1)
    # The node came back empty (no persistence here): counting starts afresh, exactly.
    assert back.allowed
    assert [(await deny.admit(ALICE, "chat-small")).allowed for _ in range(3)] == [True, True, False]
    await store.close()


async def test_a_replica_that_took_over_is_found_with_the_counts(own_cluster: RedisCluster) -> None:
    owner = own_cluster.owner(KEY_TAG)
    replica = own_cluster.add_replica(owner)
    # Only the masters are named: the replica is learnt from CLUSTER SLOTS once it is the owner.
    store = open_counter_store(own_cluster.url.replace(f",127.0.0.1:{replica}", ""), timeout_s=1.0)
    gov = Governor(make_policy(limits=[{"scope": "user", "requests": "25/hour"}]), store)
    assert all([(await gov.admit(ALICE, "chat-small")).allowed for _ in range(10)])
    assert own_cluster.client(owner).execute_command("WAIT", 1, 10_000) == 1
    own_cluster.stop_node(owner)
    for _ in range(300):
        first = await gov.admit(ALICE, "chat-small")
        if first.code != "limiter_unavailable":
            break
        await asyncio.sleep(0.1)
    assert own_cluster.owner(KEY_TAG) == replica
    results = [first] + [await gov.admit(ALICE, "chat-small") for _ in range(20)]
    assert sum(r.allowed for r in results) == 15
    await store.close()


def test_the_policy_takes_a_cluster_dsn_and_logs_it_redacted() -> None:
    policy = make_policy(limiter={"storage": "redis+cluster://:s3cret-pw@10.0.0.1:7000,10.0.0.2:7001"})
    store = open_counter_store(policy.limiter.storage)
    assert isinstance(store, ClusterCounterStore)
    assert store.uri == "redis+cluster://:***@10.0.0.1:7000,10.0.0.2:7001"
    for bad in ("redis+cluster://", "redis+cluster://host:port", "redis+cluster://a:1,,b:2"):
        with pytest.raises(ValueError, match="host:port"):
            open_counter_store(bad)


@pytest.mark.parametrize("storage", ["no node listening", "a Redis that is no cluster"])
async def test_a_cluster_that_cannot_be_found_is_a_storage_outage(storage: str, redis_url: str) -> None:
    port = free_port() if storage == "no node listening" else int(redis_url.rsplit(":", 1)[1].split("/")[0])
    store = open_counter_store(f"redis+cluster://127.0.0.1:{port}", timeout_s=1.0)
    refused = await Governor(make_policy(limits=[{"scope": "user", "requests": "3/hour"}]), store).admit(ALICE, "chat-small")
    assert (refused.allowed, refused.code) == (False, "limiter_unavailable")
    assert "no Redis Cluster node told the slot's owner" in refused.message
    assert store.errors == 1
    await store.close()
