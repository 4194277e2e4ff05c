"""A fake OpenAI-compatible upstream speaking the documented wire format.

The model name scripts its behaviour: `fail-<status>`, `garbage`, `error-200`, `hang`, `cut-stream`,
`reset-stream`, `error-stream`; anything else answers normally. Every request is kept in `requests`.
An `Answer` scripts a richer reply (refusal, reasoning, tool calls, logprobs), each text in the pieces a stream sends.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import orjson
from aiohttp import web

WORDS = ["Hello", " from", " the", " fake", " upstream", "."]


def _prompt_tokens(body: dict) -> int:
    text = orjson.dumps(body.get("messages") or body.get("prompt") or body.get("input") or "")
    return max(1, len(text) // 4)


def _usage(body: dict, completion: int) -> dict:
    prompt = _prompt_tokens(body)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0}}


def _entry(token: str) -> dict:
    return {"token": token, "logprob": -0.5, "bytes": list(token.encode()),
            "top_logprobs": [{"token": token, "logprob": -0.5, "bytes": list(token.encode())}]}


@dataclass
class Answer:
    """A scripted assistant answer; each text is the list of pieces a stream sends it in (None: absent)."""

    content: list[str] | None = None
    refusal: list[str] | None = None
    reasoning_content: list[str] | None = None
    tool_arguments: list[list[str]] = field(default_factory=list)
    logprobs: bool = False

    def message(self) -> dict:
        message: dict = {"role": "assistant", "content": None if self.content is None else "".join(self.content),
                         "refusal": None if self.refusal is None else "".join(self.refusal)}
        if self.reasoning_content is not None:
            message["reasoning_content"] = "".join(self.reasoning_content)
        if self.tool_arguments:
            message["tool_calls"] = [{"id": f"call_{i}", "type": "function",
                                      "function": {"name": "send_mail", "arguments": "".join(pieces)}}
                                     for i, pieces in enumerate(self.tool_arguments)]
        return message

    def chat_logprobs(self, tokens: list[str] | None = None) -> dict | None:
        """Logprobs of these tokens (default: the whole content, one token per piece)."""
        if not self.logprobs:
            return None
        return {"content": [_entry(t) for t in (self.content or [] if tokens is None else tokens)], "refusal": None}

    def completion_logprobs(self, pieces: list[str]) -> dict | None:
        if not self.logprobs:
            return None
        offsets = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
        return {"tokens": pieces, "token_logprobs": [-0.5] * len(pieces),
                "top_logprobs": [{p: -0.5} for p in pieces], "text_offset": offsets}

    def deltas(self) -> list[tuple[dict, dict | None]]:
        """Each chat delta in stream order, with the logprobs that come with it."""
        out: list[tuple[dict, dict | None]] = []
        for name in ("reasoning_content", "content", "refusal"):
            for piece in getattr(self, name) or []:
                out.append(({name: piece}, self.chat_logprobs([piece]) if name == "content" else None))
        for i, pieces in enumerate(self.tool_arguments):
            first = {"index": i, "id": f"call_{i}", "type": "function", "function": {"name": "send_mail", "arguments": ""}}
            out.append(({"tool_calls": [first]}, None))
            out.extend(({"tool_calls": [{"index": i, "function": {"arguments": p}}]}, None) for p in pieces)
        return out

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_arguments else "stop"


class FakeOpenAI:
    def __init__(self, chunk_delay_s: float = 0.0, words: list[str] | None = None, answer: Answer | None = None) -> None:
        self.requests: list[tuple[str, dict, dict[str, str]]] = []
        self.chunk_delay_s = chunk_delay_s
        self.words = words or WORDS
        self.answer = answer

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self.chat)
        return app

    async def _scripted(self, request: web.Request, path: str) -> tuple[dict, web.StreamResponse | None]:
        body = await request.json()
        self.requests.append((path, body, dict(request.headers)))
        model = str(body.get("model", ""))
        if model.startswith("fail-"):
            status = int(model.split("-")[1])
            error = {"message": f"scripted failure {status}", "type": "server_error", "param": None, "code": None}
            return body, web.json_response({"error": error}, status=status)
        if model == "garbage":
            return body, web.Response(body=b"<html>502 Bad Gateway</html>", content_type="application/json")
        if model == "error-200":
            return body, web.json_response({"error": {"message": "overloaded", "type": "server_error"}})
        if model == "hang":
            await asyncio.sleep(3600)
        return body, None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, scripted = await self._scripted(request, request.path)
        if scripted is not None:
            return scripted
        if body.get("stream"):
            return await self._stream(request, body, chat=True)
        if self.answer is not None:
            return web.json_response({
                "id": "chatcmpl-fake1", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "message": self.answer.message(), "logprobs": self.answer.chat_logprobs(),
                             "finish_reason": self.answer.finish_reason}],
                "usage": _usage(body, 5)})
        text = "".join(self.words)
        return web.json_response({
            "id": "chatcmpl-fake1", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": _usage(body, len(self.words)), "system_fingerprint": "fp_fake",
        })

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body, scripted = await self._scripted(request, request.path)
        if scripted is not None:
            return scripted
        if body.get("stream"):
            return await self._stream(request, body, chat=False)
        pieces = (self.answer.content or []) if self.answer is not None else self.words
        logprobs = self.answer.completion_logprobs(pieces) if self.answer is not None else None
        return web.json_response({
            "id": "cmpl-fake1", "object": "text_completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "text": "".join(pieces), "logprobs": logprobs, "finish_reason": "stop"}],
            "usage": _usage(body, len(self.words)),
        })

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body, scripted = await self._scripted(request, request.path)
        if scripted is not None:
            return scripted
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [0.1 * (i + 1), 0.2, 0.3]} for i in range(len(inputs))]
        usage = _usage(body, 0)
        return web.json_response({"object": "list", "data": data, "model": body["model"],
                                  "usage": {"prompt_tokens": usage["prompt_tokens"], "total_tokens": usage["prompt_tokens"]}})

    async def _stream(self, request: web.Request, body: dict, chat: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        model = body["model"]
        base = {"id": "chatcmpl-fake1" if chat else "cmpl-fake1",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": model}

        def chunk(delta: dict | None, finish: str | None, logprobs: dict | None = None) -> dict:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish} if chat else \
                {"index": 0, "text": (delta or {}).get("content", ""), "logprobs": logprobs, "finish_reason": finish}
            out = {**base, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            return out

        async def send(data: dict) -> None:
            await response.write(b"data: " + orjson.dumps(data) + b"\n\n")

        if model == "error-stream":
            await send({"error": {"message": "scripted mid-stream failure", "type": "server_error"}})
            return response
        if chat:
            await send(chunk({"role": "assistant", "content": ""}, None))
        if self.answer is not None:
            answer = self.answer
            scripted = answer.deltas() if chat else [
                ({"content": p}, answer.completion_logprobs([p])) for p in answer.content or []]
            for delta, logprobs in scripted:
                await send(chunk(delta, None, logprobs))
            await send(chunk({}, answer.finish_reason))
            if include_usage:
                await send({**base, "choices": [], "usage": _usage(body, 5)})
            await response.write(b"data: [DONE]\n\n")
            return response
        for i, word in enumerate(self.words):
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            await send(chunk({"content": word}, None))
            if model == "reset-stream" and i == 1:
                assert request.transport is not None
                request.transport.abort()
                return response
            if model == "hang-stream" and i == 1:
                await asyncio.sleep(3600)
        if model == "cut-stream":
            return response
        await send(chunk({}, "stop"))
        if include_usage:
            await send({**base, "choices": [], "usage": _usage(body, len(self.words))})
        await response.write(b"data: [DONE]\n\n")
        return response
