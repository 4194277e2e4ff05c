"""The OpenAI surface through the real `openai` SDK, in front of a fake OpenAI upstream."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import pytest

from tests.conftest import sdk
from tests.fakes.openai_upstream import WORDS, FakeOpenAI

POLICY = """
providers:
  up: {{type: openai, base_url: "{url}", api_key: "sk-upstream-secret"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
  embed-small: {{targets: [{{provider: up, model: text-embedding-3-small}}]}}
"""


@pytest.fixture
async def gateway(make_gateway, fake_openai):
    fake, upstream = fake_openai
    server = await make_gateway(POLICY, url=str(upstream.make_url("/v1")))
    return fake, server


async def test_chat_answers_and_routes_the_model_name(gateway) -> None:
    fake, server = gateway
    reply = await sdk(server).chat.completions.create(
        model="chat-default", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "".join(WORDS)
    assert reply.usage is not None and reply.usage.completion_tokens == len(WORDS)
    path, body, headers = fake.requests[-1]
    assert path == "/v1/chat/completions"
    assert body["model"] == "gpt-4o-mini"
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert headers["Authorization"] == "Bearer sk-upstream-secret"


async def test_streamed_chat_strips_usage_the_client_did_not_ask_for(gateway) -> None:
    fake, server = gateway
    stream = await sdk(server).chat.completions.create(
        model="chat-default", messages=[{"role": "user", "content": "hi"}], stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(WORDS)
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    assert fake.requests[-1][1]["stream_options"] == {"include_usage": True}


async def test_streamed_chat_keeps_usage_when_asked(gateway) -> None:
    _, server = gateway
    stream = await sdk(server).chat.completions.create(
        model="chat-default", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(WORDS)


async def test_stream_chunks_arrive_as_the_upstream_sends_them(make_gateway, aiohttp_server) -> None:
    fake = FakeOpenAI(chunk_delay_s=0.3)
    upstream = await aiohttp_server(fake.app())
    server = await make_gateway(POLICY, url=str(upstream.make_url("/v1")))
    stream = await sdk(server).chat.completions.create(
        model="chat-default", messages=[{"role": "user", "content": "hi"}], stream=True)
    arrivals = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
    # Six words 0.3 s apart: a relay that buffered would deliver them all at once at the end.
    assert len(arrivals) == len(WORDS)
    assert arrivals[-1] - arrivals[0] > 1.0


async def test_completions(gateway) -> None:
    fake, server = gateway
    reply = await sdk(server).completions.create(model="chat-default", prompt="Say hi")
    assert reply.choices[0].text == "".join(WORDS)
    assert fake.requests[-1][0] == "/v1/completions"
    stream = await sdk(server).completions.create(model="chat-default", prompt="Say hi", stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == "".join(WORDS)


async def test_embeddings(gateway) -> None:
    fake, server = gateway
    reply = await sdk(server).embeddings.create(model="embed-small", input=["a", "b"], encoding_format="float")
    assert [d.index for d in reply.data] == [0, 1]
    assert len(reply.data[0].embedding) == 3
    assert fake.requests[-1][1]["model"] == "text-embedding-3-small"


async def test_models_list_and_get(gateway) -> None:
    _, server = gateway
    client = sdk(server)
    models = await client.models.list()
    assert sorted(m.id for m in models.data) == ["chat-default", "embed-small"]
    model = await client.models.retrieve("chat-default")
    assert model.id == "chat-default" and model.owned_by == "lockgate"


async def test_health_ready_and_metrics(gateway) -> None:
    _, server = gateway
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/healthz")) as resp:
            assert resp.status == 200
        async with session.get(server.make_url("/readyz")) as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ready"
        await sdk(server).chat.completions.create(model="chat-default", messages=[{"role": "user", "content": "x"}])
        async with session.get(server.make_url("/metrics")) as resp:
            text = await resp.text()
    assert 'lockgate_requests_total{endpoint="chat",route="chat-default",status="200"}' in text
    assert "lockgate_request_duration_seconds_bucket" in text
    assert 'lockgate_upstream_duration_seconds_count{provider="up"}' in text
    assert "lockgate_in_flight_requests" in text


async def test_metrics_show_an_event_loop_stall_once(gateway) -> None:
    """A blocking call on the loop shows as its lag: the worst since the last scrape, then the histogram keeps it."""
    _, server = gateway

    def worst(text: str) -> float:
        return float(re.search(r"^lockgate_event_loop_lag_max_seconds (\S+)$", text, re.MULTILINE)[1])

    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/metrics")) as resp:
            await resp.text()
        await asyncio.sleep(0.2)
        time.sleep(0.3)  # blocks the loop the gateway runs on
        await asyncio.sleep(0.1)
        async with session.get(server.make_url("/metrics")) as resp:
            stalled = await resp.text()
        await asyncio.sleep(0.2)
        async with session.get(server.make_url("/metrics")) as resp:
            after = await resp.text()
    assert worst(stalled) >= 0.2
    assert worst(after) < 0.2
    assert 'lockgate_event_loop_lag_seconds_bucket{le="1.0"}' in after
