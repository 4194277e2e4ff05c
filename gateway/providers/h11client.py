"""A small HTTP/1.1 keep-alive client for the HTTP providers.

A general client builds a request object, a header multidict and a writer task for every call; a provider
always sends the same headers to the same origin, so its request head is built once and each call is one
`write`, a head parse and, for a short answer, no wait beyond the first read. One asyncio Protocol per pooled
connection; a connection goes back to its pool only when its response was read to the end and the upstream
did not ask to close it.

Nothing the upstream sends is trusted: framing follows h11framing's strict reading of RFC 9112, the head and a
whole-body read are bounded (`max_head_bytes`, `max_response_bytes`), and a read that passes its bound fails at
once rather than at the end of the body.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from urllib.parse import urlsplit

from gateway.providers.h11framing import ProtocolError
from gateway.providers.h11response import MAX_HEAD_BYTES, MAX_RESPONSE_BYTES, Response

__all__ = ["MAX_HEAD_BYTES", "MAX_RESPONSE_BYTES", "ConnectError", "HttpClient", "ProtocolError", "Response"]

_IDLE_S = 30.0


class ConnectError(OSError):
    """No connection to the upstream could be opened."""


class _Connection(asyncio.Protocol):
    __slots__ = ("idle_since", "lost", "pool", "response", "transport")

    def __init__(self, pool: Pool) -> None:
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.pool = pool
        self.lost = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.response is not None:
            self.response.feed(data)
        else:
            self.close()

    def eof_received(self) -> bool:
        if self.response is not None:
            self.response.feed_end(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.response is not None:
            self.response.feed_end(exc)
        self.pool.forget(self)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class Pool:
    """The connections to one origin, at most `limit` open at once."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None, limit: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.host, self.port, self.ssl = host, port, ssl_context
        self.limit = limit
        self.open = 0
        self._idle: list[_Connection] = []
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, connect_s: float | None, deadline: float | None) -> _Connection:
        while True:
            now = time.monotonic()
            while self._idle:
                conn = self._idle.pop()
                if not conn.lost and now - conn.idle_since < _IDLE_S:
                    return conn
                self._drop(conn)
            if self.open < self.limit:
                break
            await self._wait_for_slot(deadline)
        self.open += 1
        try:
            return await self._connect(connect_s, deadline)
        except BaseException:
            self.open -= 1
            self._wake_one()
            raise

    async def _connect(self, connect_s: float | None, deadline: float | None) -> _Connection:
        if deadline is not None:
            left = deadline - time.monotonic()
            connect_s = left if connect_s is None else min(connect_s, left)
        try:
            async with asyncio.timeout(connect_s):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None)
        except TimeoutError:
            raise
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        return conn

    async def _wait_for_slot(self, deadline: float | None) -> None:
        waiter = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(None if deadline is None else
                                          self.loop.time() + deadline - time.monotonic()):
                await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()
            else:
                self._waiters.remove(waiter)
            raise

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def put_back(self, conn: _Connection, reuse: bool) -> None:
        conn.response = None
        if reuse and not conn.lost:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
            if not conn.lost:
                self._drop_count(conn)
        self._wake_one()

    def forget(self, conn: _Connection) -> None:
        """The connection closed: it leaves the idle list, and the count unless put_back already took it off."""
        if conn in self._idle:
            self._idle.remove(conn)
        self._drop_count(conn)
        self._wake_one()

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        self._drop_count(conn)

    def _drop_count(self, conn: _Connection) -> None:
        if conn.pool is self:
            conn.pool = _CLOSED
            self.open -= 1

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


class _Closed:
    """Stands in for the pool of a connection already taken off its pool's count."""

    def forget(self, conn: _Connection) -> None:
        return None


_CLOSED: Pool = _Closed()  # type: ignore[assignment]


class HttpClient:
    """POSTs to any number of origins, a pool each; request heads are built once per (url, headers).

    `max_head_bytes` bounds a response head; `max_response_bytes` a whole-body `read()`, any one chunk and any
    Content-Length.
    """

    def __init__(self, max_connections: int, ssl_context: ssl.SSLContext | None = None,
                 max_head_bytes: int = MAX_HEAD_BYTES, max_response_bytes: int = MAX_RESPONSE_BYTES) -> None:
        self.max_connections = max_connections
        self.max_head_bytes = max_head_bytes
        self.max_response_bytes = max_response_bytes
        self._ssl = ssl_context
        self._pools: dict[tuple[str, str, int], Pool] = {}
        self._heads: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[Pool, bytes]] = {}

    def _target(self, url: str, headers: dict[str, str]) -> tuple[Pool, bytes]:
        key = (url, tuple(headers.items()))
        found = self._heads.get(key)
        if found is not None:
            return found
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConnectError(f"not an http(s) URL: {url}")
        secure = parts.scheme == "https"
        port = parts.port or (443 if secure else 80)
        origin = (parts.scheme, parts.hostname, port)
        pool = self._pools.get(origin)
        if pool is None:
            context = (self._ssl or ssl.create_default_context()) if secure else None
            pool = self._pools[origin] = Pool(parts.hostname, port, context, self.max_connections)
        host = parts.hostname if parts.port is None else f"{parts.hostname}:{port}"
        if ":" in parts.hostname:
            host = f"[{parts.hostname}]" if parts.port is None else f"[{parts.hostname}]:{port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # Without Accept-Encoding the upstream answers uncompressed, which is all this client reads.
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{name}: {value}" for name, value in headers.items()
                  if name.lower() not in ("host", "content-length", "accept-encoding", "transfer-encoding")]
        found = self._heads[key] = (pool, ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1"))
        return found

    async def post(self, url: str, body: bytes, headers: dict[str, str], connect_s: float | None,
                   read_s: float | None, total_s: float | None, per_request: bytes = b"") -> Response:
        """Sends the request and returns once the response head arrived; raises TimeoutError, ConnectError,
        ConnectionError or ProtocolError. `per_request`: header lines (each ending in CRLF) that differ on every
        call, such as a traceparent, kept out of the cached head."""
        pool, head = self._target(url, headers)
        deadline = None if total_s is None else time.monotonic() + total_s
        conn = await pool.acquire(connect_s, deadline)
        response = conn.response = Response(conn, pool, read_s, deadline, self.max_head_bytes, self.max_response_bytes)
        try:
            if conn.lost or conn.transport is None:
                raise ConnectionResetError("the connection closed before the request was sent")
            conn.transport.write(b"%s%d\r\n%s\r\n%s" % (head, len(body), per_request, body))
            await response.head()
        except BaseException:
            response.release()
            raise
        return response

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._heads.clear()
