"""A fake Anthropic Messages API upstream in the documented wire format (checked by the real SDK)."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

WORDS = ["Hello", " from", " fake", " Claude", "."]


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"type": "error", "error": {"type": kind, "message": message}}, status=status,
                             headers={"request-id": "req_fake"})


class FakeAnthropic:
    def __init__(self, api_key: str = "sk-ant-test", chunk_delay_s: float = 0.0) -> None:
        self.api_key = api_key
        self.chunk_delay_s = chunk_delay_s
        self.requests: list[tuple[dict, dict[str, str]]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self.messages)
        return app

    def _usage(self, body: dict) -> dict:
        return {"input_tokens": max(1, len(orjson.dumps(body["messages"])) // 4), "output_tokens": 0,
                "cache_read_input_tokens": 3, "cache_creation_input_tokens": 0}

    def _content(self, body: dict) -> tuple[list[dict], str]:
        if body.get("tools"):
            tool = body["tools"][0]
            return [{"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_fake1", "name": tool["name"], "input": {"city": "Paris"}}], "tool_use"
        words = WORDS[: body["max_tokens"]]
        stop = "max_tokens" if len(words) < len(WORDS) else "end_turn"
        return [{"type": "text", "text": "".join(words)}], stop

    async def messages(self, request: web.Request) -> web.StreamResponse:
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.api_key not in (request.headers.get("x-api-key"), bearer):
            return _error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return _error(400, "invalid_request_error", "anthropic-version header is required")
        body = await request.json()
        self.requests.append((body, dict(request.headers)))
        if "max_tokens" not in body or not body.get("messages"):
            return _error(400, "invalid_request_error", "max_tokens and messages are required")
        if body["model"] == "overloaded":
            return _error(529, "overloaded_error", "Overloaded")
        content, stop = self._content(body)
        usage = self._usage(body)
        if not body.get("stream"):
            usage["output_tokens"] = sum(len(b.get("text", "")) // 3 + 1 for b in content)
            return web.json_response({"id": "msg_fake1", "type": "message", "role": "assistant", "model": body["model"],
                                      "content": content, "stop_reason": stop, "stop_sequence": None, "usage": usage},
                                     headers={"request-id": "req_fake"})
        return await self._stream(request, body, content, stop, usage)

    async def _stream(self, request: web.Request, body: dict, content: list[dict], stop: str,
                      usage: dict) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "request-id": "req_fake"})
        await response.prepare(request)

        async def send(event: str, data: dict) -> None:
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            await response.write(f"event: {event}\n".encode() + b"data: " + orjson.dumps(data) + b"\n\n")

        start_usage = {**usage, "output_tokens": 1}
        await send("message_start", {"type": "message_start", "message": {
            "id": "msg_fake1", "type": "message", "role": "assistant", "content": [], "model": body["model"],
            "stop_reason": None, "stop_sequence": None, "usage": start_usage}})
        await send("ping", {"type": "ping"})
        output = 0
        for index, block in enumerate(content):
            if block["type"] == "text":
                await send("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": {"type": "text", "text": ""}})
                words = [w for w in WORDS if w in block["text"]] if block["text"] == "".join(WORDS) else [block["text"]]
                if len(words) < len(WORDS) and stop == "max_tokens":
                    words = WORDS[: body["max_tokens"]]
                for word in words:
                    output += 1
                    await send("content_block_delta", {"type": "content_block_delta", "index": index,
                                                       "delta": {"type": "text_delta", "text": word}})
            else:
                await send("content_block_start", {"type": "content_block_start", "index": index, "content_block": {
                    "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}})
                arguments = orjson.dumps(block["input"]).decode()
                for part in (arguments[:5], arguments[5:]):
                    await send("content_block_delta", {"type": "content_block_delta", "index": index,
                                                       "delta": {"type": "input_json_delta", "partial_json": part}})
                output += 4
            await send("content_block_stop", {"type": "content_block_stop", "index": index})
        await send("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"output_tokens": output}})
        await send("message_stop", {"type": "message_stop"})
        return response
