"""Transport shared by the HTTP providers: one pooled client session, failures mapped to UpstreamError."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import orjson

from gateway.providers.base import UpstreamError
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
    def __init__(self, provider: str, max_connections: int) -> None:
        self.provider = provider
        self.max_connections = max_connections
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=300, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def post(
        self, url: str, body: bytes, headers: dict[str, str], timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        """Sends the request; returns the response once its headers arrived with a 2xx status."""
        assert self.session is not None, "provider used before start()"
        try:
            response = await self.session.post(url, data=body, headers=headers, timeout=timeout)
        except TimeoutError as exc:
            raise UpstreamError("timeout", f"{self.provider}: no answer within the timeout") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError("connect", f"{self.provider}: cannot reach upstream ({type(exc).__name__})") from exc
        if response.status >= 300:
            try:
                raw = await response.read()
            except (aiohttp.ClientError, TimeoutError):
                raw = b""
            finally:
                response.release()
            message, error = _error_message(raw, response.status)
            raise UpstreamError("status", f"{self.provider}: {message}", response.status, error)
        return response

    async def read_json(self, response: aiohttp.ClientResponse) -> tuple[dict, bytes]:
        try:
            raw = await response.read()
        except TimeoutError as exc:
            raise UpstreamError("timeout", f"{self.provider}: the answer did not arrive within the timeout") from exc
        except aiohttp.ClientError as exc:
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

    async def events(
        self, response: aiohttp.ClientResponse, reader: EventReader
    ) -> AsyncIterator[tuple[str, dict | None]]:
        """Yields (event name, parsed data) from an SSE body; data is None for `[DONE]`."""
        try:
            async for name, data in reader:
                if data == b"[DONE]":
                    yield name, None
                    continue
                try:
                    parsed = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise UpstreamError("invalid", f"{self.provider}: upstream sent an invalid stream event") from None
                if not isinstance(parsed, dict):
                    raise UpstreamError("invalid", f"{self.provider}: upstream sent a stream event that is not an object")
                yield name, parsed
        except TimeoutError as exc:
            raise UpstreamError("timeout", f"{self.provider}: the stream stalled past the timeout") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError("reset", f"{self.provider}: connection lost mid-stream") from exc
        finally:
            response.release()
