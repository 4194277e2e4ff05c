"""The client connection every door is reached through: time and count limits, and HTTP parser errors.

aiohttp answers a request its parser refused in plain text and logs the parser's message with a traceback; that
message quotes the offending bytes, which can be a bearer key. Here such a request gets OpenAI's error shape and one
log line naming only the kind of fault. aiohttp also has no deadline for a request head, so a client that trickles
one byte at a time would hold the connection for the whole keep-alive time; and a client that stops reading would
hold its answer (and the upstream request behind it) forever: both are cut here.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import Counter

log = logging.getLogger("lockgate.connections")

CUT = Counter("lockgate_client_connections_cut", "Client connections closed by a client-side limit", ["reason"])
REFUSED = Counter("lockgate_client_requests_refused", "Requests refused by the HTTP parser", ["reason"])

# What the client is told for each parser fault; never the parser's own message, which quotes the request's bytes.
_FAULTS: list[tuple[type[Exception], int, str, str]] = [
    (http_exceptions.LineTooLong, 431, "header_too_large",
     "A request line or header is larger than the server accepts."),
    (http_exceptions.BadHttpMethod, 400, "bad_http_method",
     "The request is not an HTTP/1.1 request (HTTP/2 needs TLS with ALPN, which this listener does not offer)."),
    (http_exceptions.BadStatusLine, 400, "bad_request_line", "The request line is malformed."),
    (http_exceptions.InvalidHeader, 400, "bad_header", "A request header is malformed."),
    (http_exceptions.ContentEncodingError, 400, "bad_content_encoding",
     "The request body cannot be decoded as its Content-Encoding says."),
    (http_exceptions.DecompressSizeError, 413, "request_too_large", "The decompressed request body is too large."),
    (http_exceptions.TransferEncodingError, 400, "bad_body_framing", "The request body's chunked framing is malformed."),
    (http_exceptions.ContentLengthError, 400, "bad_body_framing", "The request body is shorter than its Content-Length."),
    (http_exceptions.InvalidURLError, 400, "bad_url", "The request URL is malformed."),
    (http_exceptions.HttpProcessingError, 400, "bad_request", "The request is not valid HTTP/1.1."),
]


def describe_fault(exc: BaseException | None) -> tuple[int, str, str]:
    """(status, code, message) for a request the HTTP layer could not read."""
    for kind, status, code, message in _FAULTS:
        if isinstance(exc, kind):
            return status, code, message
    return 400, "bad_request", "The request is not valid HTTP/1.1."


def error_body(status: int, message: str, code: str, type_: str = "invalid_request_error") -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


@dataclass(frozen=True, slots=True)
class ClientLimits:
    header_timeout_s: float
    write_timeout_s: float
    max_connections: int


_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s")


class GatewayRequestHandler(RequestHandler):
    """aiohttp's connection handler with a head deadline, a write deadline, a connection cap and quiet errors."""

    __slots__ = ("_head_timer", "_limits", "_write_timer")

    def __init__(self, manager: Any, *, limits: ClientLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager = self._manager
        if manager is not None and len(manager.connections) >= self._limits.max_connections:
            body = error_body(503, "The gateway has as many client connections as it accepts; retry shortly.",
                              "too_many_connections", "api_error")
            transport.write(_BUSY % (len(body), body))  # type: ignore[attr-defined]
            transport.close()
            CUT.labels("max_connections").inc()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        counted = self._request_count
        super().data_received(data)
        if self._request_count != counted:
            self._cancel_head_timer()
        elif self._head_timer is None and not self._request_in_progress and not self._messages:
            # The first bytes of a request head: the whole head must follow within the deadline.
            self._head_timer = self._loop.call_later(self._limits.header_timeout_s, self._head_expired)

    async def _handle_request(self, request: Any, start_time: Any, request_handler: Any) -> Any:
        self._cancel_head_timer()
        expect = request.headers.get("Expect")
        if expect is not None and expect.lower() != "100-continue":
            # aiohttp refuses these before any middleware, in plain text (and with a 500 for non-ASCII values).
            request_handler = _refuse_expectation
        return await super()._handle_request(request, start_time, request_handler)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self._loop.call_later(self._limits.write_timeout_s, self._write_expired)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if not self._request_in_progress and not self._messages and self.transport is not None:
            CUT.labels("header_timeout").inc()
            log.info("closed a connection whose request head did not arrive within %.0f s",
                     self._limits.header_timeout_s)
            self.force_close()

    def _write_expired(self) -> None:
        self._write_timer = None
        transport = self.transport
        if transport is not None:
            CUT.labels("write_timeout").inc()
            log.info("cut a client that read nothing for %.0f s", self._limits.write_timeout_s)
            # abort, not close: close would wait for the unread buffer, and the writer waiting on it must fail now.
            transport.abort()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500 or exc is None or not isinstance(exc, http_exceptions.HttpProcessingError):
            if status == 500:
                log.error("unhandled error in the HTTP layer (%s)", type(exc).__name__ if exc else "no exception")
            body = error_body(status, "The gateway failed to handle the request.", "internal_error", "api_error")
        else:
            status, code, text = describe_fault(exc)
            REFUSED.labels(code).inc()
            log.info("refused a malformed request (%s: %s)", code, type(exc).__name__)
            body = error_body(status, text, code)
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had started; the connection is closed instead")
        response = web.Response(status=status, body=body, content_type="application/json")
        response.force_close()
        return response


async def _refuse_expectation(request: web.BaseRequest) -> web.StreamResponse:
    REFUSED.labels("bad_expect").inc()
    response = web.Response(status=417, content_type="application/json", body=error_body(
        417, "The only Expect value served is 100-continue.", "expectation_failed"))
    response.force_close()
    return response


class GatewayServer(web.Server):
    """aiohttp's low-level server, making connections with GatewayRequestHandler."""

    def __init__(self, *args: Any, limits: ClientLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits

    def __call__(self) -> RequestHandler:
        return GatewayRequestHandler(self, loop=self._loop, limits=self._limits, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """An AppRunner whose server is a GatewayServer."""

    def __init__(self, app: web.Application, *, limits: ClientLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return GatewayServer(made.request_handler, request_factory=made.request_factory,
                             handler_cancellation=made.handler_cancellation, loop=made._loop, limits=self._limits,
                             **made._kwargs)
