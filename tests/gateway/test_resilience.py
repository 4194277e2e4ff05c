"""Upstreams that fail in every way we know: the client gets the fallback's answer or a clear error, never a hang."""

from __future__ import annotations

import openai
import pytest

from gateway.context import GATEWAY
from gateway.exchange import Exchange
from gateway.routing.upstream import complete, open_stream
from tests.conftest import sdk
from tests.fakes.flaky_upstream import FlakyOpenAI
from tests.fakes.openai_upstream import WORDS

HI = [{"role": "user", "content": "hi"}]
ANSWER = "".join(WORDS)

# Provider `a`'s own timeouts are long: only the routes' timeouts can cut its hangs in these tests.
POLICY = """
providers:
  a: {{type: openai, base_url: "{a}"}}
  b: {{type: openai, base_url: "{b}"}}
routes:
  backup: {{targets: [{{provider: b, model: backup-model}}]}}
  retried: {{targets: [{{provider: a, model: gpt-4o-mini}}], retry: {{attempts: 3, backoff_ms: 1}}}}
  retry-500-only: {{targets: [{{provider: a, model: gpt-4o-mini}}], fallbacks: [backup],
                   retry: {{attempts: 3, backoff_ms: 1, "on": [500]}}}}
  two-arms: {{targets: [{{provider: a, model: fail-503, weight: 1000000}}, {{provider: b, model: sibling, weight: 1}}],
             fallbacks: [backup]}}
  client-fault: {{targets: [{{provider: a, model: fail-400}}], fallbacks: [backup]}}
  hang-alone: {{targets: [{{provider: a, model: hang}}], timeout: {{first_byte_ms: 300}}}}
"""
FAILING_MODELS = ["error-200", "garbage", "fail-500", "hang", "reset-before-first", "empty-stream", "error-stream",
                  "cut-stream", "reset-stream", "hang-stream"]
for _model in FAILING_MODELS:
    POLICY += f"""  {_model}: {{{{targets: [{{{{provider: a, model: {_model}}}}}], fallbacks: [backup],
      timeout: {{{{first_byte_ms: 300}}}}}}}}\n"""


@pytest.fixture
async def upstreams(aiohttp_server) -> tuple[FlakyOpenAI, FlakyOpenAI, str, str]:
    a, b = FlakyOpenAI(), FlakyOpenAI()
    a_server, b_server = await aiohttp_server(a.app()), await aiohttp_server(b.app())
    return a, b, str(a_server.make_url("/v1")), str(b_server.make_url("/v1"))


@pytest.fixture
async def gateway(make_gateway, upstreams):
    a, b, a_url, b_url = upstreams
    return a, b, await make_gateway(POLICY, a=a_url, b=b_url)


@pytest.mark.parametrize("route", ["error-200", "garbage", "fail-500", "hang"])
async def test_a_failing_target_is_answered_by_the_fallback_route(gateway, route: str) -> None:
    a, b, server = gateway
    async with sdk(server) as client:
        reply = await client.chat.completions.create(model=route, messages=HI)
    assert reply.model == "backup-model" and reply.choices[0].message.content == ANSWER
    assert a.models() == [route] and b.models() == ["backup-model"]


@pytest.mark.parametrize("route", ["reset-before-first", "empty-stream", "error-stream", "fail-500", "hang"])
async def test_a_stream_that_dies_before_its_first_byte_is_answered_by_the_fallback(gateway, route: str) -> None:
    a, _, server = gateway
    async with sdk(server) as client:
        stream = await client.chat.completions.create(model=route, messages=HI, stream=True)
        chunks = [c async for c in stream]
    assert {c.model for c in chunks} == {"backup-model"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert a.models() == [route]


@pytest.mark.parametrize("route", ["cut-stream", "reset-stream", "hang-stream"])
async def test_a_stream_that_dies_after_its_first_byte_ends_with_an_error_event(gateway, route: str) -> None:
    _, b, server = gateway
    received = []
    async with sdk(server) as client:
        stream = await client.chat.completions.create(model=route, messages=HI, stream=True)
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                received.append(chunk)
    assert received and received[0].model == route
    assert info.value.message
    assert b.requests == []


async def test_a_hang_is_cut_by_the_route_timeout(gateway) -> None:
    _, _, server = gateway
    async with sdk(server) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="hang-alone", messages=HI)
    assert info.value.status_code == 504 and info.value.code == "upstream_timeout"


async def test_listed_failures_are_retried_on_the_same_target(gateway) -> None:
    a, _, server = gateway
    a.fail_next = 2
    async with sdk(server) as client:
        reply = await client.chat.completions.create(model="retried", messages=HI)
    assert reply.model == "gpt-4o-mini"
    assert a.models() == ["gpt-4o-mini"] * 3


async def test_retries_give_up_with_the_last_failure(gateway) -> None:
    a, _, server = gateway
    a.fail_next = 5
    async with sdk(server) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="retried", messages=HI)
    assert info.value.status_code == 502 and "503" in info.value.message
    assert len(a.requests) == 3


async def test_a_client_fault_is_neither_retried_nor_sent_to_the_fallback(gateway) -> None:
    a, b, server = gateway
    async with sdk(server) as client:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="client-fault", messages=HI)
    assert len(a.requests) == 1 and b.requests == []


@pytest.fixture
async def compiled(gateway):
    a, b, server = gateway
    return a, b, server.app[GATEWAY].policy, server.app[GATEWAY].resilience


async def test_the_record_names_every_attempt_each_fallback_reason_and_the_answering_target(compiled) -> None:
    a, _, policy, resilience = compiled
    a.fail_next = 1
    ex = Exchange("chat")
    await complete(policy.routes["retry-500-only"], "chat", {"model": "retry-500-only", "messages": HI}, ex,
                   policy, resilience)
    # 503 is not in this route's `on` list: no retry, straight to the fallback.
    assert ex.attempts == 2
    assert ex.fallbacks == ["a/gpt-4o-mini -> 503"]
    assert (ex.provider, ex.model, ex.split_arm) == ("b", "backup-model", "b/backup-model")


async def test_the_routes_other_targets_are_tried_before_its_fallback_routes(compiled) -> None:
    _, b, policy, resilience = compiled
    ex = Exchange("chat")
    reply = await complete(policy.routes["two-arms"], "chat", {"model": "two-arms", "messages": HI}, ex,
                           policy, resilience)
    assert reply.data["model"] == "sibling"
    assert b.models() == ["sibling"]
    assert ex.attempts == 2
    assert ex.fallbacks == ["a/fail-503 -> 503"]


async def test_misbehaving_streams_are_recorded_with_their_reason(compiled) -> None:
    _, _, policy, resilience = compiled
    reasons = {}
    for model in ("error-stream", "empty-stream", "hang"):
        ex = Exchange("chat")
        stream = await open_stream(policy.routes[model], "chat", {"model": model, "messages": HI, "stream": True},
                                   ex, policy, resilience)
        await stream.aclose()
        reasons[model] = ex.fallbacks
        assert ex.model == "backup-model" and ex.attempts == 2
    assert reasons == {"error-stream": ["a/error-stream -> invalid"], "empty-stream": ["a/empty-stream -> reset"],
                       "hang": ["a/hang -> timeout"]}
