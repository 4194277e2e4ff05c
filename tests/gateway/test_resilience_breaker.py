"""Circuit breakers: a dead target is skipped for its cooldown, probed once, readmitted, and remembered across reloads."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from gateway.context import GATEWAY
from gateway.routing.breaker import CLOSED, HALF_OPEN, OPEN, BreakerRegistry
from policies.schema import CircuitBreakerConfig
from tests.conftest import policy_text, sdk
from tests.fakes.flaky_upstream import FlakyOpenAI

HI = [{"role": "user", "content": "hi"}]
CONFIG = CircuitBreakerConfig(failures=3, cooldown_s=30)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_a_success_resets_the_count() -> None:
    clock = Clock()
    breaker = BreakerRegistry(clock).get("unit-route", "p/m")
    for _ in range(2):
        breaker.failure(CONFIG)
    breaker.success()
    for _ in range(2):
        breaker.failure(CONFIG)
    assert breaker.state == CLOSED and breaker.allow(CONFIG)
    breaker.failure(CONFIG)
    assert breaker.state == OPEN and not breaker.allow(CONFIG)
    assert REGISTRY.get_sample_value("lockgate_circuit_breaker_state", {"route": "unit-route", "target": "p/m"}) == 1


def test_after_the_cooldown_one_probe_goes_and_its_outcome_decides() -> None:
    clock = Clock()
    breaker = BreakerRegistry(clock).get("unit-probe", "p/m")
    for _ in range(3):
        breaker.failure(CONFIG)
    clock.now += 31
    assert breaker.allow(CONFIG) and breaker.state == HALF_OPEN
    assert not breaker.allow(CONFIG), "a second request went through while the probe was out"
    breaker.failure(CONFIG)
    assert breaker.state == OPEN and not breaker.allow(CONFIG)
    clock.now += 31
    assert breaker.allow(CONFIG)
    breaker.abandon()
    assert breaker.allow(CONFIG), "a cancelled probe kept the breaker shut"
    breaker.success()
    assert breaker.state == CLOSED and breaker.allow(CONFIG) and breaker.allow(CONFIG)
    assert REGISTRY.get_sample_value("lockgate_circuit_breaker_state", {"route": "unit-probe", "target": "p/m"}) == 0


POLICY = """
providers:
  a: {{type: openai, base_url: "{a}"}}
  b: {{type: openai, base_url: "{b}"}}
routes:
  backup: {{targets: [{{provider: b, model: backup-model}}]}}
  guarded: {{targets: [{{provider: a, model: gpt-4o-mini}}], fallbacks: [backup],
            circuit_breaker: {{failures: 2, cooldown_s: {cooldown}}}}}
"""


@pytest.fixture
async def setup(aiohttp_server, make_gateway):
    a, b = FlakyOpenAI(), FlakyOpenAI()
    urls = {"a": str((await aiohttp_server(a.app())).make_url("/v1")),
            "b": str((await aiohttp_server(b.app())).make_url("/v1"))}
    return a, b, urls, await make_gateway(POLICY, cooldown=0.3, **urls)


def _state() -> float | None:
    return REGISTRY.get_sample_value("lockgate_circuit_breaker_state", {"route": "guarded", "target": "a/gpt-4o-mini"})


async def test_a_dead_target_is_skipped_by_its_breaker_and_readmitted_after_cooldown(setup) -> None:
    a, _, _, server = setup
    a.down = True
    async with sdk(server) as client:
        for _ in range(2):
            reply = await client.chat.completions.create(model="guarded", messages=HI)
            assert reply.model == "backup-model"
        assert len(a.requests) == 2 and _state() == OPEN
        reply = await client.chat.completions.create(model="guarded", messages=HI)
        assert reply.model == "backup-model"
        assert len(a.requests) == 2, "the open breaker let a request through to the dead target"
        a.down = False
        await asyncio.sleep(0.4)
        reply = await client.chat.completions.create(model="guarded", messages=HI)
        assert reply.model == "gpt-4o-mini" and _state() == CLOSED
        assert len(a.requests) == 3


async def test_breaker_state_survives_a_policy_reload(setup, policy_file) -> None:
    a, _, urls, server = setup
    a.down = True
    async with sdk(server) as client:
        for _ in range(2):
            await client.chat.completions.create(model="guarded", messages=HI)
        assert _state() == OPEN
        # Same target, longer cooldown, one more route: the breaker must stay open with the new cooldown.
        policy_file(policy_text(POLICY + "  extra: {{targets: [{{provider: b, model: x}}]}}\n", cooldown=60, **urls))
        changed, message = await server.app[GATEWAY].holder.reload()
        assert changed, message
        a.down = False
        await asyncio.sleep(0.4)
        reply = await client.chat.completions.create(model="guarded", messages=HI)
    assert reply.model == "backup-model" and len(a.requests) == 2 and _state() == OPEN
