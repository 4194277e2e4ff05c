"""A fake Anthropic Messages API upstream in the documented wire format (checked by the real SDK).

Every request is kept in `requests` with its headers. `words` are the answer's text as a stream sends it; a request
that enables `thinking` gets a thinking block first (`thoughts`, then a signature). The model name scripts the rest:
`overloaded` (529), `redacted-thinking` (a redacted_thinking block after the thinking), `unknown-events` (events and
a delta of types the SDK does not know, between the usual ones), `malformed` (a message whose content is not a list;
streamed: a text delta whose text is a number after the first word), `malformed-start` (streamed: a message_start
whose usage is not a count), `error-event` (an overloaded error event after the first word).
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

WORDS = ["Hello", " from", " fake", " Claude", "."]
THOUGHTS = ["Let me", " think."]
SIGNATURE = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"
REDACTED = "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpP"


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"type": "error", "error": {"type": kind, "message": message}}, status=status,
                             headers={"request-id": "req_fake"})


def _thinking(body: dict) -> bool:
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") == "enabled"


class FakeAnthropic:
    def __init__(self, api_key: str = "sk-ant-test", chunk_delay_s: float = 0.0) -> None:
        self.api_key = api_key
        self.chunk_delay_s = chunk_delay_s
        self.requests: list[tuple[dict, dict[str, str]]] = []
        self.words = list(WORDS)
        self.thoughts = list(THOUGHTS)
        self.cache_creation_tokens = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self.messages)
        return app

    def _usage(self, body: dict) -> dict:
        return {"input_tokens": max(1, len(orjson.dumps(body["messages"])) // 4), "output_tokens": 0,
                "cache_read_input_tokens": 3, "cache_creation_input_tokens": self.cache_creation_tokens}

    def _content(self, body: dict) -> tuple[list[dict], str]:
        """The answer's blocks, each text block's text as the list of pieces it streams in, and the stop reason."""
        blocks: list[dict] = []
        if _thinking(body):
            blocks.append({"type": "thinking", "thinking": list(self.thoughts), "signature": SIGNATURE})
            if body["model"] == "redacted-thinking":
                blocks.append({"type": "redacted_thinking", "data": REDACTED})
        if body.get("tools"):
            tool = body["tools"][0]
            return [*blocks, {"type": "text", "text": ["Let me check."]},
                    {"type": "tool_use", "id": "toolu_fake1", "name": tool["name"], "input": {"city": "Paris"}}], "tool_use"
        words = self.words[: body["max_tokens"]]
        stop = "max_tokens" if len(words) < len(self.words) else "end_turn"
        return [*blocks, {"type": "text", "text": words}], stop

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
            whole = [{**block, "text": "".join(block["text"])} if block["type"] == "text" else
                     {**block, "thinking": "".join(block["thinking"])} if block["type"] == "thinking" else block
                     for block in content]
            usage["output_tokens"] = sum(len(b.get("text", "")) // 3 + 1 for b in whole)
            message = {"id": "msg_fake1", "type": "message", "role": "assistant", "model": body["model"],
                       "content": whole, "stop_reason": stop, "stop_sequence": None, "usage": usage}
            if body["model"] == "malformed":
                message["content"] = {"type": "text", "text": "not a list"}
            return web.json_response(message, headers={"request-id": "req_fake"})
        return await self._stream(request, body, content, stop, usage)

    async def _stream(self, request: web.Request, body: dict, content: list[dict], stop: str,
                      usage: dict) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "request-id": "req_fake"})
        await response.prepare(request)
        model = body["model"]

        async def send(event: str, data: dict) -> None:
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            await response.write(f"event: {event}\n".encode() + b"data: " + orjson.dumps(data) + b"\n\n")

        async def delta(index: int, payload: dict) -> None:
            await send("content_block_delta", {"type": "content_block_delta", "index": index, "delta": payload})

        start_usage = {**usage, "output_tokens": 1} if model != "malformed-start" else {"input_tokens": "n/a"}
        await send("message_start", {"type": "message_start", "message": {
            "id": "msg_fake1", "type": "message", "role": "assistant", "content": [], "model": model,
            "stop_reason": None, "stop_sequence": None, "usage": start_usage}})
        await send("ping", {"type": "ping"})
        if model == "unknown-events":
            await send("future_event", {"type": "future_event", "detail": {"note": "from a newer API"}})
        output = 0
        for index, block in enumerate(content):
            if block["type"] == "text":
                await send("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": {"type": "text", "text": ""}})
                for number, word in enumerate(block["text"]):
                    output += 1
                    if number == 1 and model == "malformed":
                        await delta(index, {"type": "text_delta", "text": 5})
                        return response
                    if number == 1 and model == "error-event":
                        await send("error", {"type": "error", "error": {"type": "overloaded_error",
                                                                        "message": "Overloaded"}})
                        return response
                    await delta(index, {"type": "text_delta", "text": word})
                    if number == 0 and model == "unknown-events":
                        await delta(index, {"type": "future_delta", "payload": "opaque"})
            elif block["type"] == "thinking":
                await send("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": {"type": "thinking", "thinking": "", "signature": ""}})
                for piece in block["thinking"]:
                    output += 1
                    await delta(index, {"type": "thinking_delta", "thinking": piece})
                await delta(index, {"type": "signature_delta", "signature": block["signature"]})
            elif block["type"] == "redacted_thinking":
                await send("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})
            else:
                await send("content_block_start", {"type": "content_block_start", "index": index, "content_block": {
                    "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}})
                arguments = orjson.dumps(block["input"]).decode()
                for part in (arguments[:5], arguments[5:]):
                    await delta(index, {"type": "input_json_delta", "partial_json": part})
                output += 4
            await send("content_block_stop", {"type": "content_block_stop", "index": index})
        await send("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"output_tokens": output}})
        await send("message_stop", {"type": "message_stop"})
        return response
