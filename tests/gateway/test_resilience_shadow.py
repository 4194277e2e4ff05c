"""Shadow traffic: mirrored in the background, recorded on its own, never in the client's way."""

from __future__ import annotations

import asyncio
import dataclasses

import openai
import pytest
from prometheus_client import REGISTRY

from gateway.context import GATEWAY
from gateway.exchange import Exchange
from gateway.routing.shadow import ShadowRunner
from gateway.routing.upstream import complete, open_stream
from tests.conftest import sdk
from tests.fakes.flaky_upstream import FlakyOpenAI
from tests.fakes.openai_upstream import WORDS

HI = [{"role": "user", "content": "hi"}]

POLICY = """
providers:
  a: {{type: openai, base_url: "{a}"}}
  b: {{type: openai, base_url: "{b}"}}
routes:
  live: {{targets: [{{provider: a, model: gpt-4o-mini}}], shadow: {{route: candidate, percent: 100}}}}
  candidate: {{targets: [{{provider: b, model: candidate-model}}]}}
  live-slow-shadow: {{targets: [{{provider: a, model: gpt-4o-mini}}], shadow: {{route: slow-candidate, percent: 100}}}}
  slow-candidate: {{targets: [{{provider: b, model: slow-1500}}]}}
  live-broken-shadow: {{targets: [{{provider: a, model: gpt-4o-mini}}], shadow: {{route: broken, percent: 100}}}}
  broken: {{targets: [{{provider: b, model: fail-500}}]}}
  never-mirrored: {{targets: [{{provider: a, model: gpt-4o-mini}}], shadow: {{route: candidate, percent: 0}}}}
"""


@pytest.fixture
async def setup(aiohttp_server, make_gateway):
    a, b = FlakyOpenAI(), FlakyOpenAI()
    server = await make_gateway(POLICY, a=str((await aiohttp_server(a.app())).make_url("/v1")),
                                b=str((await aiohttp_server(b.app())).make_url("/v1")))
    recorded: list[Exchange] = []
    shadows = server.app[GATEWAY].resilience.shadows
    shadows.record = recorded.append
    return a, b, server, shadows, recorded


async def _settled(shadows: ShadowRunner) -> None:
    for _ in range(200):
        if not shadows.in_flight:
            return
        await asyncio.sleep(0.025)
    raise AssertionError("shadow calls never finished")


async def test_shadow_gets_the_same_request_and_both_answers_are_recorded_apart(setup) -> None:
    a, b, server, shadows, recorded = setup
    async with sdk(server) as client:
        raw = await client.chat.completions.with_raw_response.create(model="live", messages=HI)
    reply = raw.parse()
    assert reply.model == "gpt-4o-mini"
    await _settled(shadows)
    assert b.requests[0][1]["messages"] == a.requests[0][1]["messages"] == HI
    [shadow] = recorded
    assert shadow.is_shadow and shadow.shadow_of == raw.headers["x-request-id"]
    assert (shadow.route, shadow.model, shadow.status, shadow.user) == ("candidate", "candidate-model", 200, "alice")
    assert shadow.usage is not None and shadow.usage.completion_tokens == len(WORDS)
    assert shadow.response_payload is None, "payloads were kept while the policy does not log them"


async def test_a_streamed_request_is_mirrored_as_a_stream(setup) -> None:
    _, b, server, shadows, recorded = setup
    async with sdk(server) as client:
        stream = await client.chat.completions.create(model="live", messages=HI, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await _settled(shadows)
    [shadow] = recorded
    assert text == "".join(WORDS)
    assert shadow.streamed and shadow.usage is not None and shadow.usage.completion_tokens == len(WORDS)
    assert b.requests[0][1]["stream"] is True


@pytest.mark.parametrize("stream", [False, True])
async def test_with_payload_logging_the_shadow_answer_is_recorded_whole(setup, stream: bool) -> None:
    _, _, server, shadows, recorded = setup
    policy = dataclasses.replace(server.app[GATEWAY].policy, log_payloads=True)
    body = {"model": "live", "messages": HI, "stream": stream}
    call = open_stream if stream else complete
    answer = await call(policy.routes["live"], "chat", body, Exchange("chat"), policy, server.app[GATEWAY].resilience)
    if stream:
        await answer.aclose()
    await _settled(shadows)
    [shadow] = recorded
    assert shadow.request_payload == body
    assert shadow.response_payload["choices"][0]["message"]["content"] == "".join(WORDS)


async def test_a_slow_shadow_does_not_hold_the_answer_back(setup) -> None:
    _, _, server, shadows, recorded = setup
    async with sdk(server) as client:
        reply = await client.chat.completions.create(model="live-slow-shadow", messages=HI)
    assert reply.model == "gpt-4o-mini"
    assert shadows.in_flight == 1 and recorded == [], "the client's answer waited for the shadow"
    await _settled(shadows)
    assert recorded[0].status == 200


async def test_a_failing_shadow_is_recorded_and_the_client_never_sees_it(setup) -> None:
    _, _, server, shadows, recorded = setup
    async with sdk(server) as client:
        reply = await client.chat.completions.create(model="live-broken-shadow", messages=HI)
    assert reply.choices[0].message.content == "".join(WORDS)
    await _settled(shadows)
    assert (recorded[0].status, recorded[0].error_code) == (502, "upstream_error")


async def test_percent_zero_mirrors_nothing(setup) -> None:
    _, b, server, shadows, recorded = setup
    async with sdk(server) as client:
        await client.chat.completions.create(model="never-mirrored", messages=HI)
    assert shadows.in_flight == 0 and b.requests == [] and recorded == []


async def test_shadows_beyond_the_bound_are_skipped_and_counted(setup) -> None:
    _, _, server, shadows, recorded = setup
    shadows.max_in_flight = 1
    labels = {"route": "slow-candidate", "outcome": "skipped"}
    before = REGISTRY.get_sample_value("lockgate_shadow_requests_total", labels) or 0
    async with sdk(server) as client:
        await asyncio.gather(*(client.chat.completions.create(model="live-slow-shadow", messages=HI)
                               for _ in range(3)))
    assert shadows.in_flight == 1
    assert REGISTRY.get_sample_value("lockgate_shadow_requests_total", labels) == before + 2
    await _settled(shadows)
    assert len(recorded) == 1


async def test_close_cancels_shadows_that_outlive_the_grace_period() -> None:
    runner = ShadowRunner()
    finished = asyncio.Event()
    cancelled = asyncio.Event()

    async def quick(ex: Exchange) -> None:
        finished.set()

    async def endless(ex: Exchange) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    runner.start(Exchange("chat", route="r"), quick)
    runner.start(Exchange("chat", route="r"), endless)
    await runner.close(grace_s=0.2)
    assert finished.is_set() and cancelled.is_set() and runner.in_flight == 0


async def test_shadow_calls_do_not_count_against_the_users_limits(make_gateway, aiohttp_server) -> None:
    a, b = FlakyOpenAI(), FlakyOpenAI()
    limited = POLICY + "limits: [{{scope: user, requests: 2/minute}}]\n"
    server = await make_gateway(limited, a=str((await aiohttp_server(a.app())).make_url("/v1")),
                                b=str((await aiohttp_server(b.app())).make_url("/v1")))
    async with sdk(server) as client:
        for _ in range(2):
            await client.chat.completions.create(model="live", messages=HI)
            await _settled(server.app[GATEWAY].resilience.shadows)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="live", messages=HI)
    assert len(b.requests) == 2
