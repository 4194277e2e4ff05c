"""One HTTP/1.1 response as the providers' client reads it: its head, how its body is framed, and the body as
it arrives, fed by the connection's protocol and read by the provider. Framing follows h11framing's strict
reading of RFC 9112; the head and a whole-body read are bounded, and a read that passes its bound fails at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from gateway.providers.h11client import Pool, _Connection

MAX_HEAD_BYTES = 65536
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
_MAX_CHUNK_LINE = 1024
_HEX_PREFIX = (b"x", b"X")
_MAX_BUFFERED = 1 << 20


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
