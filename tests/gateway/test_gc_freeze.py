"""A served gateway freezes its start-up heap, Presidio included, out of the cyclic collector's full walks."""

from __future__ import annotations

import asyncio
import gc
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway import server
from tests.conftest import policy_text, sdk
from tests.fakes.openai_upstream import FakeOpenAI
from tests.served import Served, start_gateway

POLICY = """
providers:
  up: {{type: openai, base_url: "{url}", api_key: "sk-upstream"}}
routes:
  chat-default: {{targets: [{{provider: up, model: m}}]{guardrails}}}
guardrails:
  pii: {{entities: [EMAIL_ADDRESS, PHONE_NUMBER, CREDIT_CARD, US_SSN]}}
"""
GUARDED = ", guardrails: {{input: {{pii: mask}}}}"
# Presidio's recognizers, phone metadata and spaCy's tables: ~64 k tracked objects when measured; a quarter of that is
# far above what a policy or a few requests add, and far below Presidio itself.
PRESIDIO_OBJECTS = 16_000


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI()


@pytest.fixture
async def upstream(aiohttp_server, fake: FakeOpenAI):
    return await aiohttp_server(fake.app())


async def _serve(tmp_path: Path, upstream, guarded: bool, *args: str) -> Served:
    path = tmp_path / f"policy-{'guarded' if guarded else 'plain'}.yaml"
    guardrails = GUARDED if guarded else ""
    path.write_text(policy_text(POLICY.replace("{guardrails}", guardrails), url=str(upstream.make_url("/v1"))))
    return await start_gateway(path, *args, ready_timeout_s=90)


@pytest.fixture
async def gateways(tmp_path: Path, upstream) -> AsyncIterator[list[Served]]:
    started: list[Served] = []
    yield started
    for gateway in started:
        if gateway.process.poll() is None:
            gateway.process.terminate()
            gateway.process.wait(timeout=30)


async def _frozen(served: Served) -> float:
    """lockgate_gc_frozen_objects (under the supervisor: the smallest worker's); 0 while no worker wrote it."""
    async with aiohttp.ClientSession() as session, session.get(served.make_url("/metrics")) as resp:
        text = await resp.text()
    (value,) = re.findall(r"^lockgate_gc_frozen_objects (\S+)$", text, re.M) or ["0"]
    return float(value)


async def _settled_frozen(served: Served, at_least: float) -> float:
    """The frozen count once it is at least `at_least`, or what it is after 60 s."""
    count = 0.0
    for _ in range(600):
        count = await _frozen(served)
        if count >= at_least:
            break
        await asyncio.sleep(0.1)
    return count


async def test_presidio_is_frozen_once_loaded_and_still_masks(tmp_path: Path, upstream, fake: FakeOpenAI,
                                                              gateways) -> None:
    plain = await _serve(tmp_path, upstream, guarded=False)
    gateways.append(plain)
    guarded = await _serve(tmp_path, upstream, guarded=True)
    gateways.append(guarded)
    plain_frozen = await _settled_frozen(plain, 1)
    assert plain_frozen > 0
    guarded_frozen = await _settled_frozen(guarded, plain_frozen + PRESIDIO_OBJECTS)
    assert guarded_frozen >= plain_frozen + PRESIDIO_OBJECTS, (plain_frozen, guarded_frozen)
    # Freezing changes no verdict: an address still needs (and gets) Presidio's scan.
    answer = await sdk(guarded).chat.completions.create(
        model="chat-default", messages=[{"role": "user", "content": "write to jane.doe@example.com"}])
    assert answer.choices[0].message.content is not None
    (_path, body, _), = fake.requests
    assert "jane.doe@example.com" not in str(body["messages"]) and "<EMAIL_ADDRESS>" in str(body["messages"]), body


async def test_every_worker_freezes_presidio(tmp_path: Path, upstream, gateways) -> None:
    plain = await _serve(tmp_path, upstream, False)
    gateways.append(plain)
    plain_frozen = await _settled_frozen(plain, 1)
    guarded = await _serve(tmp_path, upstream, True, "--workers", "2")
    gateways.append(guarded)
    smallest = await _settled_frozen(guarded, plain_frozen + PRESIDIO_OBJECTS)
    assert smallest >= plain_frozen + PRESIDIO_OBJECTS, (plain_frozen, smallest)


async def _freeze_after_loads(loads: int) -> list[bool]:
    """Runs the worker's freeze task while Presidio loads for `loads` polls; returns whether the collector was on at
    each poll. The collector and the frozen heap are as before afterwards."""
    states = iter([True] * loads + [False])
    seen: list[bool] = []

    def loading() -> bool:
        seen.append(gc.isenabled())
        return next(states)

    frozen_before = gc.get_freeze_count()
    try:
        await server._freeze_when_loaded(loading)
        assert gc.isenabled()
        assert gc.get_freeze_count() > frozen_before
    finally:
        gc.unfreeze()
        gc.enable()
    return seen


async def test_collector_is_off_while_presidio_loads_and_back_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "_FREEZE_POLL_S", 0.01)
    assert await _freeze_after_loads(3) == [False] * 4


async def test_collector_comes_back_after_its_bound_even_if_presidio_still_loads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "_FREEZE_POLL_S", 0.01)
    monkeypatch.setattr(server, "_COLLECTOR_OFF_S", 0.0)
    assert await _freeze_after_loads(3) == [False, True, True, True]
