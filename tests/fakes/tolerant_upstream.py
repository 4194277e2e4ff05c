"""An OpenAI-compatible upstream that answers every request well, whatever its body, on a thread of its own.

For tests whose own code is synchronous (hypothesis): the gateway under test must survive any client input by
itself, so this upstream never refuses anything and never fails.
"""

from __future__ import annotations

import asyncio
import threading
import time

import orjson
from aiohttp import web

from tests.served import free_port

_USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def _chat(model: str) -> dict:
    return {"id": "chatcmpl-t", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there"}, "finish_reason": "stop"}],
            "usage": _USAGE}


def _text(model: str) -> dict:
    return {"id": "cmpl-t", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": "Hi there", "finish_reason": "stop"}], "usage": _USAGE}


async def _answer(request: web.Request) -> web.StreamResponse:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        body = {}
    model = str(body.get("model", "m")) if isinstance(body, dict) else "m"
    if request.path.endswith("/embeddings"):
        return web.json_response({"object": "list", "model": model, "usage": {"prompt_tokens": 1, "total_tokens": 1},
                                  "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}]})
    chat = request.path.endswith("/chat/completions")
    if not (isinstance(body, dict) and body.get("stream") is True):
        return web.json_response(_chat(model) if chat else _text(model))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    kind = "chat.completion.chunk" if chat else "text_completion"
    for piece, finish in (("Hi", None), (" there", "stop")):
        choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
        chunk = {"id": "c", "object": kind, "created": 1, "model": model, "choices": [{**choice, "finish_reason": finish}]}
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
    usage = {"id": "c", "object": kind, "created": 1, "model": model, "choices": [], "usage": _USAGE}
    await response.write(b"data: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n")
    return response


class TolerantUpstream:
    """Runs until stop(); `url` is its OpenAI base URL."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tolerant-upstream", daemon=True)

    def start(self) -> TolerantUpstream:
        self._thread.start()
        assert self._ready.wait(10), "the tolerant upstream did not start"
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/{path:.*}", _answer)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
