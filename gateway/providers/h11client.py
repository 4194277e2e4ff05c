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

from gateway.providers.h11framing import (
    CHUNK_DATA,
    CHUNK_END,
    CHUNK_SIZE,
    DONE,
    HEAD,
    LENGTH,
    TRAILER,
    UNTIL_EOF,
    ProtocolError,
    body_framing,
    chunk_size,
    parse_head,
)

__all__ = ["MAX_HEAD_BYTES", "MAX_RESPONSE_BYTES", "ConnectError", "HttpClient", "ProtocolError", "Response"]

MAX_HEAD_BYTES = 65536
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
_MAX_CHUNK_LINE = 1024
_HEX_PREFIX = (b"x", b"X")
_MAX_BUFFERED = 1 << 20
_IDLE_S = 30.0


class ConnectError(OSError):
    """No connection to the upstream could be opened."""


class Response:
    """One response, read as its bytes arrive; `release()` always, once done with it."""

    __slots__ = ("_body", "_buf", "_buffered", "_conn", "_deadline", "_error", "_hold", "_limit", "_loop", "_max_head",
                 "_paused", "_pool", "_read_s", "_released", "_remaining", "_scanned", "_state", "_threshold", "_waiter",
                 "headers", "keep_alive", "status")

    def __init__(self, conn: _Connection, pool: Pool, read_s: float | None, deadline: float | None,
                 max_head: int = MAX_HEAD_BYTES, limit: int = MAX_RESPONSE_BYTES) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.keep_alive = False
        self._conn = conn
        self._pool = pool
        self._state = HEAD
        self._buf = b""
        self._body: list[bytes] = []
        self._buffered = 0
        # Past this many buffered body bytes a streamed read pauses the upstream and a whole read fails.
        self._threshold = _MAX_BUFFERED
        self._remaining = 0
        self._scanned = 0
        self._max_head = max_head
        self._limit = limit
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._read_s = read_s
        self._deadline = deadline
        self._loop = pool.loop
        self._released = False
        self._paused = False
        self._hold = False

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()

    # Called by the connection, from the event loop.

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._buf = self._buf + data if self._buf else data
        try:
            self._parse()
        except ProtocolError as exc:
            self._fail(exc)
            return
        if self._buffered > self._threshold:
            self._over_threshold()
        self._wake()

    def _over_threshold(self) -> None:
        if self._hold:
            self._fail(ProtocolError(f"the answer is larger than the limit of {self._threshold} bytes"))
        elif not self._paused:
            # A reader that is behind stops the upstream through TCP.
            self._paused = True
            self._conn.transport.pause_reading()  # type: ignore[union-attr]

    def feed_end(self, exc: BaseException | None) -> None:
        if self._state == UNTIL_EOF:
            self._state = DONE
            self._wake()
        elif self._state != DONE:
            self._fail(ConnectionResetError("the upstream closed the connection before the response ended"))

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._conn.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _parse(self) -> None:
        # Walks the buffer by offset and slices once at the end: a read often holds many small chunks.
        # Every branch advances `pos`, changes state or stops, so no input can keep this loop turning.
        buf = self._buf
        size = len(buf)
        pos = 0
        body = self._body
        while pos < size:
            state = self._state
            if state == HEAD:
                self._buf = buf[pos:]
                if not self._parse_head():
                    return
                buf, pos, size = self._buf, 0, len(self._buf)
            elif state == CHUNK_SIZE:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if size - pos > _MAX_CHUNK_LINE:
                        raise ProtocolError("chunk size line too long")
                    break
                line = buf[pos:end]
                # isalnum rules out the signs, blanks and underscores int() takes; only "0x" and non-hex letters are
                # left, and those int() refuses or the grammar check catches. A table-building translate() per
                # chunk cost more than the rest of this branch.
                if 0 < len(line) <= 16 and line.isalnum() and line[1:2] not in _HEX_PREFIX:
                    try:
                        remaining = int(line, 16)
                    except ValueError:
                        remaining = chunk_size(line)
                else:
                    remaining = chunk_size(line)
                if remaining > self._limit:
                    raise ProtocolError(f"a chunk of {remaining} bytes is larger than the limit of {self._limit} bytes")
                pos = end + 2
                if not remaining:
                    self._state = TRAILER
                elif pos + remaining + 2 <= size:
                    # The whole chunk and its CRLF are here (the common case): one step instead of three.
                    if buf[pos + remaining:pos + remaining + 2] != b"\r\n":
                        raise ProtocolError("chunk not followed by CRLF")
                    body.append(buf[pos:pos + remaining])
                    self._buffered += remaining
                    pos += remaining + 2
                else:
                    self._remaining = remaining
                    self._state = CHUNK_DATA
            elif state in (CHUNK_DATA, LENGTH):
                take = min(self._remaining, size - pos)
                body.append(buf if take == size else buf[pos:pos + take])
                self._buffered += take
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = DONE if state == LENGTH else CHUNK_END
            elif state == CHUNK_END:
                if size - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ProtocolError("chunk not followed by CRLF")
                pos += 2
                self._state = CHUNK_SIZE
            elif state == TRAILER:
                if buf.startswith(b"\r\n", pos):
                    pos += 2
                else:
                    end = buf.find(b"\r\n\r\n", pos)
                    if end < 0:
                        if size - pos > self._max_head:
                            raise ProtocolError("chunked trailer too long")
                        break
                    pos = end + 4
                self._state = DONE
            elif state == UNTIL_EOF:
                body.append(buf if not pos else buf[pos:])
                self._buffered += size - pos
                pos = size
            else:
                # Bytes after the end of the response: the connection cannot be trusted with another request.
                self.keep_alive = False
                pos = size
        self._buf = buf[pos:] if pos < size else b""

    def _parse_head(self) -> bool:
        buf = self._buf
        end = buf.find(b"\r\n\r\n", self._scanned)
        if end < 0:
            if len(buf) > self._max_head:
                raise ProtocolError(f"response head larger than {self._max_head} bytes")
            # A head dripped in small pieces is searched once, not from its start on every piece.
            self._scanned = max(len(buf) - 3, 0)
            return False
        if end + 4 > self._max_head:
            raise ProtocolError(f"response head larger than {self._max_head} bytes")
        self._scanned = 0
        self._buf = buf[end + 4:]
        version, status, headers = parse_head(buf[:end])
        if status < 200:
            return True
        self.status, self.headers = status, headers
        self._state, self._remaining, self.keep_alive = body_framing(version, status, headers, self._limit)
        return True

    # Called by the reader.

    async def _wait(self) -> None:
        timeout = self._read_s
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            timeout = left if timeout is None else min(timeout, left)
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(max(timeout, 0.0), self._expire, waiter) if timeout is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            self._fail(TimeoutError("no bytes from the upstream within the timeout"))

    async def head(self) -> None:
        while self._state == HEAD:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def readany(self) -> bytes:
        """The body bytes that arrived since the last call; b"" at its end."""
        while True:
            if self._body:
                data = self._body[0] if len(self._body) == 1 else b"".join(self._body)
                self._body.clear()
                self._buffered = 0
                if self._paused:
                    self._paused = False
                    self._conn.transport.resume_reading()  # type: ignore[union-attr]
                return data
            if self._state == DONE:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; a ProtocolError as soon as it grows past `limit` (the client's response limit by default)."""
        self._hold = True
        self._threshold = self._limit if limit is None else min(limit, self._limit)
        if self._buffered > self._threshold:
            self._over_threshold()
        if self._paused and self._error is None:
            self._paused = False
            self._conn.transport.resume_reading()  # type: ignore[union-attr]
        while self._state != DONE:
            if self._error is not None:
                raise self._error
            await self._wait()
        data = b"".join(self._body)
        self._body.clear()
        self._buffered = 0
        return data

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        reuse = self._state == DONE and self.keep_alive and self._error is None and not self._paused
        self._pool.put_back(self._conn, reuse)


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
                   read_s: float | None, total_s: float | None) -> Response:
        """Sends the request and returns once the response head arrived; raises TimeoutError, ConnectError,
        ConnectionError or ProtocolError."""
        pool, head = self._target(url, headers)
        deadline = None if total_s is None else time.monotonic() + total_s
        conn = await pool.acquire(connect_s, deadline)
        response = conn.response = Response(conn, pool, read_s, deadline, self.max_head_bytes, self.max_response_bytes)
        try:
            if conn.lost or conn.transport is None:
                raise ConnectionResetError("the connection closed before the request was sent")
            conn.transport.write(b"%s%d\r\n\r\n%s" % (head, len(body), body))
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
