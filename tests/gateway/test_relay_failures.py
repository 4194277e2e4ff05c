"""A failure inside the relay after the SSE head went out ends the stream with an error event, never a second head."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import orjson
from aiohttp import web

from gateway.exchange import Exchange
from gateway.providers import ChunkStream
from gateway.streaming import RelayOptions, relay

CHUNK = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}]}


async def _chunks_then_a_bug() -> AsyncIterator[dict]:
    yield CHUNK
    raise RuntimeError("a bug past the provider's checks")


async def test_an_unexpected_exception_mid_stream_is_an_error_event_and_a_clean_end(aiohttp_server) -> None:
    closed: list[bool] = []
    exchanges: list[Exchange] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        ex = Exchange("chat")
        exchanges.append(ex)
        stream = ChunkStream(_chunks_then_a_bug(), lambda: closed.append(True))
        return await relay(request, stream, ex, RelayOptions(False, {}, None, False))

    app = web.Application()
    app.router.add_post("/stream", handler)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session, session.post(server.make_url("/stream")) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert b"HTTP/1." not in body
    events = [block.removeprefix(b"data: ") for block in body.split(b"\n\n") if block]
    assert orjson.loads(events[0]) == CHUNK
    assert orjson.loads(events[-1])["error"]["code"] == "internal_error"
    assert closed == [True] and exchanges[0].status == 500
