"""Browsers: a listed origin gets CORS headers on answers and streams and its preflights; others get nothing."""

from __future__ import annotations

import aiohttp

from tests.conftest import ALICE_KEY

POLICY = """
server: {{cors: {{allow_origins: ["https://app.example.com"]}}}}
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
"""


async def _gateway(make_gateway, fake_openai, body: str = POLICY):
    _, upstream = fake_openai
    return await make_gateway(body, url=str(upstream.make_url("/v1")))


async def test_listed_origin_gets_preflight_and_headers_on_streams(make_gateway, fake_openai) -> None:
    server = await _gateway(make_gateway, fake_openai)
    origin = {"Origin": "https://app.example.com"}
    async with aiohttp.ClientSession() as session:
        async with session.options(server.make_url("/v1/chat/completions"), headers={
                **origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
            assert "x-stainless-os" in resp.headers["Access-Control-Allow-Headers"]
        async with session.post(server.make_url("/v1/chat/completions"), headers={
                **origin, "Authorization": f"Bearer {ALICE_KEY}"}, json={
                "model": "chat-default", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as resp:
            assert resp.status == 200 and b"[DONE]" in await resp.read()
            assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
            assert "x-request-id" in resp.headers["Access-Control-Expose-Headers"]


async def test_other_origins_and_the_default_policy_allow_nothing(make_gateway, fake_openai) -> None:
    server = await _gateway(make_gateway, fake_openai)
    async with aiohttp.ClientSession() as session:
        async with session.options(server.make_url("/v1/chat/completions"), headers={
                "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}) as resp:
            assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
        async with session.get(server.make_url("/healthz"), headers={"Origin": "https://evil.example"}) as resp:
            assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers
    closed = await _gateway(make_gateway, fake_openai, POLICY.replace('["https://app.example.com"]', "[]"))
    async with aiohttp.ClientSession() as session, session.get(
            closed.make_url("/healthz"), headers={"Origin": "https://app.example.com"}) as resp:
        assert "Access-Control-Allow-Origin" not in resp.headers
