"""Transport shared by the HTTP providers: one pooled client per provider, failures mapped to UpstreamError."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import aiohttp
import orjson

from gateway.providers.base import UpstreamError
from gateway.providers.h11client import ConnectError, HttpClient, ProtocolError, Response
from gateway.sse import EventReader


def client_timeout(connect_ms: int, first_byte_ms: int, total_ms: int) -> aiohttp.ClientTimeout:
    # sock_read bounds every wait for bytes: the first byte, and each gap inside a stream.
    return aiohttp.ClientTimeout(total=total_ms / 1000, sock_connect=connect_ms / 1000, sock_read=first_byte_ms / 1000)


def _error_message(body: bytes, status: int) -> tuple[str, dict | None]:
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
    def __init__(self, provider: str, max_connections: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self.provider = provider
        self.max_connections = max_connections
        self.ssl_context = ssl_context
        self.client: HttpClient | None = None

    async def start(self) -> None:
        self.client = HttpClient(self.max_connections, self.ssl_context)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def post(self, url: str, body: bytes, headers: dict[str, str], timeout: aiohttp.ClientTimeout) -> Response:
        """Sends the request; returns the response once its head arrived with a 2xx status."""
        assert self.client is not None, "provider used before start()"
        try:
            response = await self.client.post(url, body, headers, timeout.sock_connect, timeout.sock_read,
                                              timeout.total)
        except TimeoutError as exc:
            raise UpstreamError("timeout", f"{self.provider}: no answer within the timeout") from exc
        except (ConnectError, ConnectionError, ProtocolError) as exc:
            raise UpstreamError("connect", f"{self.provider}: cannot reach upstream ({type(exc).__name__})") from exc
        if response.status >= 300:
            try:
                raw = await response.read()
            except (ConnectionError, ProtocolError, TimeoutError):
                raw = b""
            finally:
                response.release()
            message, error = _error_message(raw, response.status)
            raise UpstreamError("status", f"{self.provider}: {message}", response.status, error)
        return response

    async def read_json(self, response: Response) -> tuple[dict, bytes]:
        try:
            raw = await response.read()
        except TimeoutError as exc:
            raise UpstreamError("timeout", f"{self.provider}: the answer did not arrive within the timeout") from exc
        except (ConnectionError, ProtocolError) as exc:
            raise UpstreamError("reset", f"{self.provider}: connection lost while reading the answer") from exc
        finally:
            response.release()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError("invalid", f"{self.provider}: upstream answered with invalid JSON") from None
        if not isinstance(data, dict):
            raise UpstreamError("invalid", f"{self.provider}: upstream answered with JSON that is not an object")
        if data.get("error"):
            message, error = _error_message(raw, response.status)
            raise UpstreamError("invalid", f"{self.provider}: upstream answered 200 with an error: {message}", None, error)
        return data, raw

    def _event_object(self, data: bytes) -> dict:
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamError("invalid", f"{self.provider}: upstream sent an invalid stream event") from None
        if not isinstance(parsed, dict):
            raise UpstreamError("invalid", f"{self.provider}: upstream sent a stream event that is not an object")
        return parsed

    async def openai_chunks(self, response: Response, reader: EventReader) -> AsyncIterator[dict]:
        """The chunks of an OpenAI-style stream up to `[DONE]`; one generator, since every hop costs per chunk."""
        provider = self.provider
        try:
            async for _, data in reader:
                if data == b"[DONE]":
                    return
                chunk = self._event_object(data)
                error = chunk.get("error")
                if error:
                    error = error if isinstance(error, dict) else {"message": str(error)}
                    raise UpstreamError("invalid", f"{provider}: upstream error mid-stream: {error.get('message')}",
                                        None, error)
                yield chunk
            raise UpstreamError("reset", f"{provider}: the stream ended without [DONE]")
        except TimeoutError as exc:
            raise UpstreamError("timeout", f"{provider}: the stream stalled past the timeout") from exc
        except (ConnectionError, ProtocolError) as exc:
            raise UpstreamError("reset", f"{provider}: connection lost mid-stream") from exc
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
        except TimeoutError as exc:
            raise UpstreamError("timeout", f"{self.provider}: the stream stalled past the timeout") from exc
        except (ConnectionError, ProtocolError) as exc:
            raise UpstreamError("reset", f"{self.provider}: connection lost mid-stream") from exc
        finally:
            response.release()
