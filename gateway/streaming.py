"""Relaying an upstream stream to the client chunk by chunk, as server-sent events."""

from __future__ import annotations

import contextlib
import time

from aiohttp import web

from gateway.exchange import Exchange
from gateway.providers import ChunkStream, UpstreamError, Usage
from gateway.sse import DONE, event
from gateway.upstream import upstream_failure

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def relay(
    request: web.Request, stream: ChunkStream, ex: Exchange, client_wants_usage: bool, headers: dict[str, str]
) -> web.StreamResponse:
    response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
    opened = time.perf_counter()
    try:
        await response.prepare(request)
        async for chunk in stream:
            if not ex.first_byte_at:
                ex.first_byte_at = time.perf_counter()
            if "usage" in chunk:
                usage = chunk["usage"]
                if usage:
                    ex.usage = Usage.from_openai(usage)
                if not client_wants_usage:
                    if not chunk.get("choices"):
                        continue
                    chunk = {k: v for k, v in chunk.items() if k != "usage"}
            await response.write(event(chunk))
        await response.write(DONE)
    except UpstreamError as err:
        failure = upstream_failure(err)
        ex.status, ex.error_type, ex.error_code = failure.status, failure.type, failure.code or ""
        await _try_write(response, event(failure.payload()))
    except ConnectionError:
        ex.status, ex.error_type, ex.error_code = 499, "client_closed", "client_closed_request"
    finally:
        ex.upstream_s += time.perf_counter() - opened
        await stream.aclose()
    await _try_eof(response)
    return response


async def _try_write(response: web.StreamResponse, data: bytes) -> None:
    with contextlib.suppress(ConnectionError):
        await response.write(data)


async def _try_eof(response: web.StreamResponse) -> None:
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
