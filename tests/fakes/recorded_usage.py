"""Upstreams that answer with the usage objects their providers document, byte for byte the shapes they send.

Each family's usage is kept as recorded (`USAGES`), whole and streamed:
- OpenAI and Azure OpenAI (`openai-reasoning`): `prompt_tokens_details.cached_tokens` and
  `completion_tokens_details.reasoning_tokens`, as the docs' o-series example; a stream ends with a usage chunk
  whose `choices` is empty (`stream_options.include_usage`).
- DeepSeek (`deepseek`): `prompt_cache_hit_tokens` / `prompt_cache_miss_tokens` beside the OpenAI fields.
- OpenRouter (`openrouter`): `prompt_tokens_details.cache_write_tokens` for a prompt written to Anthropic's cache.
- Anthropic (`claude-cached`, `claude-5m`): `cache_read_input_tokens`, `cache_creation_input_tokens` and its split
  by time to live in `cache_creation`; a stream carries the input counts in `message_start` and the output in `message_delta`.
- `no-usage`: an OpenAI-compatible server that sends none; `cut-short`: a stream that stops mid-answer.
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

WORDS = ["The ", "cache ", "saved ", "money ", "today."]
TEXT = "".join(WORDS)

USAGES: dict[str, dict] = {
    "openai-reasoning": {
        "prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 256, "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    },
    "deepseek": {
        "prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120, "prompt_cache_hit_tokens": 64,
        "prompt_cache_miss_tokens": 36, "completion_tokens_details": {"reasoning_tokens": 12},
    },
    "openrouter": {
        "prompt_tokens": 1510, "completion_tokens": 40, "total_tokens": 1550,
        "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 1500},
    },
}
# The example: 10 plain input tokens, 1,000 written to the cache (400 for 5 minutes, 600 for an hour),
# 2,000 read from it, 50 output tokens.
ANTHROPIC_USAGE = {
    "input_tokens": 10, "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 2000, "output_tokens": 50,
    "cache_creation": {"ephemeral_5m_input_tokens": 400, "ephemeral_1h_input_tokens": 600},
    "service_tier": "standard",
}
# The same request with every write for 5 minutes (`claude-5m`): the 1,710 micro-dollars.
ANTHROPIC_5M_USAGE = {**ANTHROPIC_USAGE, "cache_creation": {"ephemeral_5m_input_tokens": 1000,
                                                            "ephemeral_1h_input_tokens": 0}}


def _sse(data: dict, name: str | None = None) -> bytes:
    head = b"event: " + name.encode() + b"\n" if name else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def _chunk(model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": "chatcmpl-rec", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


class RecordedUpstream:
    def __init__(self) -> None:
        self.bodies: list[dict] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._chat)
        app.router.add_post("/v1/messages", self._messages)
        return app

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        model = request.match_info.get("deployment") or body["model"]
        usage = USAGES.get(model)
        if not body.get("stream"):
            answer = {"id": "chatcmpl-rec", "object": "chat.completion", "created": 1, "model": model,
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": TEXT, "refusal": None},
                                   "logprobs": None, "finish_reason": "stop"}]}
            if usage is not None:
                answer["usage"] = usage
            return web.json_response(answer)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_sse(_chunk(model, {"role": "assistant", "content": ""})))
        for word in WORDS:
            await response.write(_sse(_chunk(model, {"content": word})))
        if model == "cut-short":
            # The connection drops mid-answer: no finish, no usage, no [DONE].
            await asyncio.sleep(0.05)
            request.transport.close()
            return response
        await response.write(_sse(_chunk(model, {}, "stop")))
        if usage is not None:
            await response.write(_sse({"id": "chatcmpl-rec", "object": "chat.completion.chunk", "created": 1,
                                       "model": model, "choices": [], "usage": usage}))
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        usage = ANTHROPIC_5M_USAGE if body["model"] == "claude-5m" else ANTHROPIC_USAGE
        message = {"id": "msg_rec", "type": "message", "role": "assistant", "model": body["model"],
                   "stop_reason": None, "stop_sequence": None}
        if not body.get("stream"):
            return web.json_response({**message, "content": [{"type": "text", "text": TEXT}], "stop_reason": "end_turn",
                                      "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        start_usage = {**usage, "output_tokens": 1}
        await response.write(_sse({"type": "message_start", "message": {**message, "content": [],
                                                                         "usage": start_usage}}, "message_start"))
        await response.write(_sse({"type": "content_block_start", "index": 0,
                                   "content_block": {"type": "text", "text": ""}}, "content_block_start"))
        for word in WORDS:
            await response.write(_sse({"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": word}}, "content_block_delta"))
        await response.write(_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
        await response.write(_sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                   "usage": {"output_tokens": usage["output_tokens"]}}, "message_delta"))
        await response.write(_sse({"type": "message_stop"}, "message_stop"))
        return response
