"""Anthropic's Messages API behind the chat completions interface."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import orjson

from gateway.providers.anthropic_translate import InvalidMessage, StreamTranslator, from_message, to_messages_request
from gateway.providers.base import ChunkStream, Completion, Op, Provider, Usage
from gateway.providers.h11client import Response
from gateway.providers.http import DEFAULT_LIMITS, HttpLimits, HttpTransport, credentials
from gateway.sse import EventReader


class AnthropicProvider(Provider):
    ops = frozenset({"chat"})

    def __init__(
        self, name: str, base_url: str, api_key: str | None, headers: dict[str, str], max_connections: int,
        anthropic_version: str, default_max_tokens: int, limits: HttpLimits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(name)
        self.url = base_url.rstrip("/") + "/v1/messages"
        self.default_max_tokens = default_max_tokens
        self.headers = {"Content-Type": "application/json", "anthropic-version": anthropic_version, **headers}
        if api_key:
            self.headers["x-api-key"] = api_key
        self.transport = HttpTransport(name, max_connections, limits=limits, secrets=credentials(self.headers, api_key))

    async def start(self) -> None:
        await self.transport.start()

    async def close(self) -> None:
        await self.transport.close()

    async def complete(self, op: Op, body: dict, timeout: aiohttp.ClientTimeout, **_: object) -> Completion:
        if op != "chat":
            return await super().complete(op, body, timeout)
        payload = orjson.dumps(to_messages_request(body, body["model"], self.default_max_tokens))
        response = await self.transport.post(self.url, payload, self.headers, timeout)
        message, _ = await self.transport.read_json(response)
        if message.get("type") != "message":
            raise self.transport.failure("invalid", "upstream answer is not a Messages API message")
        try:
            data = from_message(message)
        except InvalidMessage as exc:
            raise self.transport.failure("invalid", f"upstream message is malformed: {exc}") from None
        return Completion(data, None, Usage.from_openai(data["usage"], self.name))

    async def stream(self, op: Op, body: dict, timeout: aiohttp.ClientTimeout, **_: object) -> ChunkStream:
        if op != "chat":
            return await super().stream(op, body, timeout)
        payload = orjson.dumps(to_messages_request({**body, "stream": True}, body["model"], self.default_max_tokens))
        response = await self.transport.post(self.url, payload, self.headers, timeout)
        reader = self.transport.event_reader(response)
        return ChunkStream(self._chunks(response, reader), response.release, reader.has_buffered)

    async def _chunks(self, response: Response, reader: EventReader) -> AsyncIterator[dict]:
        translator = StreamTranslator()
        async for name, data in self.transport.events(response, reader):
            if data is None:
                continue
            if name == "error" or data.get("type") == "error":
                error = data.get("error")
                message = error.get("message") if isinstance(error, dict) else error
                raise self.transport.failure("invalid", f"upstream error mid-stream: {message}", None, error)
            try:
                chunks = translator.feed(name, data)
            except InvalidMessage as exc:
                raise self.transport.failure("invalid", f"upstream stream event is malformed: {exc}") from None
            for chunk in chunks:
                yield chunk
            if translator.finished:
                return
        raise self.transport.failure("reset", "the stream ended before message_stop")
