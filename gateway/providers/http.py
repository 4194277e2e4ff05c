"""Transport shared by the HTTP providers: one pooled client per provider, failures mapped to UpstreamError.

Whatever the upstream says about a failure reaches the client and the logs only through `failure()`, which
takes the provider's own credentials out of it and bounds its length.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import aiohttp
import orjson

from gateway import telemetry
from gateway.providers.base import FailureKind, LastEvent, UpstreamError, check_chunk
from gateway.providers.h11client import MAX_HEAD_BYTES, MAX_RESPONSE_BYTES, ConnectError, HttpClient, ProtocolError, Response
from gateway.providers.sse import MAX_EVENT_BYTES, EventReader, InvalidEvent

_MAX_MESSAGE_CHARS = 512
_MAX_ERROR_BODY_BYTES = 65536
_REDACTED = "[redacted]"
_CREDENTIAL_WORDS = ("auth", "key", "token", "secret", "cookie", "password")


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Per provider: the largest response head, whole answer and single stream event accepted from it."""

    head_bytes: int = MAX_HEAD_BYTES
    response_bytes: int = MAX_RESPONSE_BYTES
    event_bytes: int = MAX_EVENT_BYTES


DEFAULT_LIMITS = HttpLimits()


def client_timeout(connect_ms: int, first_byte_ms: int, total_ms: int) -> aiohttp.ClientTimeout:
    # sock_read bounds every wait for bytes: the first byte, and each gap inside a stream.
    return aiohttp.ClientTimeout(total=total_ms / 1000, sock_connect=connect_ms / 1000, sock_read=first_byte_ms / 1000)


def credentials(headers: dict[str, str], api_key: str | None) -> tuple[str, ...]:
    """The secrets a provider sends: its key, and the value of every header whose name says it is a credential."""
    found = {api_key} if api_key else set()
    for name, value in headers.items():
        if any(word in name.lower() for word in _CREDENTIAL_WORDS):
            found.add(value)
            scheme, _, token = value.partition(" ")
            if token.strip() and scheme.isalpha():
                found.add(token.strip())
    # Longest first, so a token inside a longer header value is not replaced before the value itself.
    return tuple(sorted((secret for secret in found if len(secret) >= 4), key=len, reverse=True))


def _error_fields(body: bytes, status: int) -> tuple[str, dict | None]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body[:200].decode(errors="replace").strip()
        return (f"HTTP {status}: {text}" if text else f"HTTP {status}"), None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or f"HTTP {status}"), error
    if isinstance(error, str):
        return error, None
    return f"HTTP {status}", None


class HttpTransport:
    def __init__(self, provider: str, max_connections: int, ssl_context: ssl.SSLContext | None = None,
                 limits: HttpLimits = DEFAULT_LIMITS, secrets: Iterable[str] = ()) -> None:
        self.provider = provider
        self.max_connections = max_connections
        self.ssl_context = ssl_context
        self.limits = limits
        self.secrets = tuple(secrets)
        self.client: HttpClient | None = None

    async def start(self) -> None:
        self.client = HttpClient(self.max_connections, self.ssl_context, self.limits.head_bytes,
                                 self.limits.response_bytes)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    def scrub(self, text: str) -> str:
        """`text` without the provider's credentials, at most _MAX_MESSAGE_CHARS long."""
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, _REDACTED)
        return text if len(text) <= _MAX_MESSAGE_CHARS else text[:_MAX_MESSAGE_CHARS] + "..."

    def failure(self, kind: FailureKind, message: str, status: int | None = None,
                error: object = None) -> UpstreamError:
        """An UpstreamError whose detail and error fields are safe to show a client."""
        fields = None
        if isinstance(error, dict):
            fields = {name: self.scrub(value) for name in ("message", "type", "code", "param")
                      if isinstance(value := error.get(name), str)}
        return UpstreamError(kind, self.scrub(f"{self.provider}: {message}"), status, fields)

    def event_reader(self, response: Response) -> EventReader:
        return EventReader(response, self.limits.event_bytes)

    async def post(self, url: str, body: bytes, headers: dict[str, str], timeout: aiohttp.ClientTimeout) -> Response:
        """Sends the request; returns the response once its head arrived with a 2xx status."""
        assert self.client is not None, "provider used before start()"
        trace_headers = b"" if telemetry.TRACING is None else telemetry.TRACING.outgoing()
        try:
            response = await self.client.post(url, body, headers, timeout.sock_connect, timeout.sock_read,
                                              timeout.total, trace_headers)
        except TimeoutError as exc:
            raise self.failure("timeout", "no answer within the timeout") from exc
        except ProtocolError as exc:
            raise self.failure("invalid", f"the upstream broke HTTP/1.1: {exc}") from exc
        except (ConnectError, ConnectionError) as exc:
            raise self.failure("connect", f"cannot reach upstream ({type(exc).__name__})") from exc
        if response.status >= 300:
            try:
                raw = await response.read(_MAX_ERROR_BODY_BYTES)
            except (ConnectionError, ProtocolError, TimeoutError):
                raw = b""
            finally:
                response.release()
            message, error = _error_fields(raw, response.status)
            raise self.failure("status", message, response.status, error)
        return response

    async def read_json(self, response: Response) -> tuple[dict, bytes]:
        try:
            raw = await response.read()
        except TimeoutError as exc:
            raise self.failure("timeout", "the answer did not arrive within the timeout") from exc
        except ProtocolError as exc:
            raise self.failure("invalid", f"the answer broke HTTP/1.1: {exc}") from exc
        except ConnectionError as exc:
            raise self.failure("reset", "connection lost while reading the answer") from exc
        finally:
            response.release()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise self.failure("invalid", "upstream answered with invalid JSON") from None
        if not isinstance(data, dict):
            raise self.failure("invalid", "upstream answered with JSON that is not an object")
        if data.get("error"):
            message, error = _error_fields(raw, response.status)
            raise self.failure("invalid", f"upstream answered 200 with an error: {message}", None, error)
        return data, raw

    def _event_object(self, data: bytes) -> dict:
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise self.failure("invalid", "upstream sent an invalid stream event") from None
        if not isinstance(parsed, dict):
            raise self.failure("invalid", "upstream sent a stream event that is not an object")
        return parsed

    def _stream_failure(self, exc: Exception) -> UpstreamError:
        if isinstance(exc, TimeoutError):
            return self.failure("timeout", "the stream stalled past the timeout")
        if isinstance(exc, (ProtocolError, InvalidEvent)):
            return self.failure("invalid", f"the stream broke its framing: {exc}")
        return self.failure("reset", "connection lost mid-stream")

    async def openai_chunks(self, response: Response, reader: EventReader, last: LastEvent) -> AsyncIterator[dict]:
        """The chunks of an OpenAI-style stream up to `[DONE]`; one generator, since every hop costs per chunk.
        `last` holds the data of the chunk yielded last."""
        provider = self.provider
        try:
            async for _, data in reader:
                if data == b"[DONE]":
                    return
                chunk = self._event_object(data)
                error = chunk.get("error")
                if error:
                    message = error.get("message") if isinstance(error, dict) else error
                    raise self.failure("invalid", f"upstream error mid-stream: {message}", None, error)
                # The common chunk (one choice, one piece of content, nothing else) is proven well-formed inline:
                # a call per chunk is measurable on a 20-chunk stream.
                choices = chunk.get("choices")
                if not (type(choices) is list and len(choices) == 1 and chunk.get("usage") is None
                        and type(choice := choices[0]) is dict and len(choice) <= 4
                        and type(delta := choice.get("delta")) is dict and len(delta) == 1
                        and type(delta.get("content")) is str and type(choice.get("index")) is int
                        and choice["index"] >= 0 and choice.get("finish_reason") is None
                        and choice.get("logprobs") is None):
                    check_chunk(chunk, provider)
                last.data = data
                yield chunk
            raise self.failure("reset", "the stream ended without [DONE]")
        except (TimeoutError, ConnectionError, ProtocolError, InvalidEvent) as exc:
            raise self._stream_failure(exc) from exc
        finally:
            response.release()

    async def events(self, response: Response, reader: EventReader) -> AsyncIterator[tuple[str, dict | None]]:
        """Yields (event name, parsed data) from an SSE body; data is None for `[DONE]`."""
        try:
            async for name, data in reader:
                if data == b"[DONE]":
                    yield name, None
                    continue
                yield name, self._event_object(data)
        except (TimeoutError, ConnectionError, ProtocolError, InvalidEvent) as exc:
            raise self._stream_failure(exc) from exc
        finally:
            response.release()
