"""Anthropic's Messages API behind the chat completions interface, and passed through natively to the Messages door."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import orjson

from gateway.providers.anthropic_native import (
    NativeCompletion,
    NativeEvents,
    NativeRequest,
    NativeStream,
    upstream_headers,
)
from gateway.providers.anthropic_translate import InvalidMessage, StreamTranslator, from_message, to_messages_request
from gateway.providers.base import ChunkStream, Completion, Op, Provider, UpstreamError, Usage
from gateway.providers.h11client import ProtocolError, Response
from gateway.providers.http import DEFAULT_LIMITS, HttpLimits, HttpTransport, credentials
from gateway.providers.sse import EventReader, InvalidEvent


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
        data = self._chat_view(message)
        return Completion(data, None, Usage.from_openai(data["usage"], self.name))

    async def complete_native(self, request: NativeRequest, model: str, timeout: aiohttp.ClientTimeout) -> NativeCompletion:
        """The client's Messages request as it is, but for the model; the upstream's message, checked, as it sent it."""
        body = {**request.body, "model": model}
        body.pop("stream", None)
        response = await self.transport.post(self.url, orjson.dumps(body), upstream_headers(self.headers, request.headers),
                                             timeout)
        message, raw = await self.transport.read_json(response)
        data = self._chat_view(message)
        return NativeCompletion(data, None, Usage.from_openai(data["usage"], self.name), message, raw)

    def _chat_view(self, message: dict) -> dict:
        if message.get("type") != "message":
            raise self.transport.failure("invalid", "upstream answer is not a Messages API message")
        try:
            return from_message(message)
        except InvalidMessage as exc:
            raise self.transport.failure("invalid", f"upstream message is malformed: {exc}") from None

    async def stream(self, op: Op, body: dict, timeout: aiohttp.ClientTimeout, **_: object) -> ChunkStream:
        if op != "chat":
            return await super().stream(op, body, timeout)
        payload = orjson.dumps(to_messages_request({**body, "stream": True}, body["model"], self.default_max_tokens))
        response = await self.transport.post(self.url, payload, self.headers, timeout)
        reader = self.transport.event_reader(response)
        return ChunkStream(self._chunks(response, reader), response.release, reader.has_buffered)

    async def stream_native(self, request: NativeRequest, model: str, timeout: aiohttp.ClientTimeout) -> NativeStream:
        """The client's Messages request streamed; each chunk carries the upstream event it was read from."""
        body = orjson.dumps({**request.body, "model": model, "stream": True})
        response = await self.transport.post(self.url, body, upstream_headers(self.headers, request.headers), timeout)
        if not response.content_type.startswith("text/event-stream"):
            response.release()
            raise self.transport.failure("invalid", "upstream did not answer with an event stream")
        reader = self.transport.event_reader(response)
        return NativeStream(self._native_chunks(response, reader), response.release, reader.has_buffered)

    def _mid_stream_error(self, data: dict) -> UpstreamError:
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        return self.transport.failure("invalid", f"upstream error mid-stream: {message}", None, error)

    async def _chunks(self, response: Response, reader: EventReader) -> AsyncIterator[dict]:
        translator = StreamTranslator()
        async for name, data in self.transport.events(response, reader):
            if data is None:
                continue
            if name == "error" or data.get("type") == "error":
                raise self._mid_stream_error(data)
            try:
                chunks = translator.feed(name, data)
            except InvalidMessage as exc:
                raise self.transport.failure("invalid", f"upstream stream event is malformed: {exc}") from None
            for chunk in chunks:
                yield chunk
            if translator.finished:
                return
        raise self.transport.failure("reset", "the stream ended before message_stop")

    async def _native_chunks(self, response: Response, reader: EventReader) -> AsyncIterator[dict]:
        events = NativeEvents()
        try:
            async for name, raw in reader:
                try:
                    event = events.parse(name, raw)
                    if event.kind == "error":
                        raise self._mid_stream_error(event.data)
                    chunk = events.chunk(event)
                except InvalidMessage as exc:
                    raise self.transport.failure("invalid", f"upstream stream event is malformed: {exc}") from None
                yield chunk
                if events.finished:
                    return
            raise self.transport.failure("reset", "the stream ended before message_stop")
        except TimeoutError as exc:
            raise self.transport.failure("timeout", "the stream stalled past the timeout") from exc
        except (ProtocolError, InvalidEvent) as exc:
            raise self.transport.failure("invalid", f"the stream broke its framing: {exc}") from exc
        except ConnectionError as exc:
            raise self.transport.failure("reset", "connection lost mid-stream") from exc
        finally:
            response.release()
