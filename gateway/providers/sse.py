"""Server-sent events: reading an upstream's event stream, writing ours."""

from __future__ import annotations

from collections import deque
from typing import Protocol

import orjson

DONE = b"data: [DONE]\n\n"
MAX_EVENT_BYTES = 1024 * 1024


def event(data: object) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class ByteSource(Protocol):
    async def readany(self) -> bytes:
        """Whatever bytes have arrived, waiting for some if none have; b"" at the end."""
        ...


class InvalidEvent(ValueError):
    """The upstream's event stream breaks the SSE format or the event size limit."""


def _parse_block(block: bytes) -> tuple[str, bytes] | None:
    if block.startswith(b"data: ") and block.find(b"\n") < 0:
        return "", block[6:]
    name = ""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            try:
                name = line[6:].strip().decode()
            except UnicodeDecodeError:
                raise InvalidEvent("an event name that is not UTF-8") from None
    return (name, b"\n".join(data)) if data else None


class EventReader:
    """Parses SSE from whatever bytes have arrived, rather than line by line.

    Reading per line costs two reads per event and wakes the transport each time; reading what is
    there and splitting on blank lines costs one. `has_buffered` tells a relay that more events are
    already parsed, so it can send them in one write.

    An event still incomplete after a read is kept as a list of pieces, and each later read is searched
    only where it could end that event, so an event that never ends costs its bytes once, up to `max_event_bytes`.
    """

    def __init__(self, content: ByteSource, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._content = content
        self._max = max_event_bytes
        self._partial: list[bytes] = []
        self._partial_bytes = 0
        self._events: deque[tuple[str, bytes]] = deque()

    def has_buffered(self) -> bool:
        return bool(self._events)

    def __aiter__(self) -> EventReader:
        return self

    async def __anext__(self) -> tuple[str, bytes]:
        while not self._events:
            data = await self._content.readany()
            if not data:
                return self._last()
            if not self._partial:
                self._split(data)
                continue
            # A blank line is LF, an optional CR, LF; two bytes of what came before are enough to see one across reads.
            window = self._partial[-1][-2:] + data[:2]
            if window.find(b"\n\n") >= 0 or window.find(b"\n\r\n") >= 0 or data.find(b"\n\n") >= 0 or data.find(b"\n\r\n") >= 0:
                rest = b"".join(self._partial) + data
                self._partial.clear()
                self._partial_bytes = 0
                self._split(rest)
            else:
                self._keep(data)
        return self._events.popleft()

    def _last(self) -> tuple[str, bytes]:
        rest = b"".join(self._partial)
        self._partial.clear()
        self._partial_bytes = 0
        last = _parse_block(rest.replace(b"\r\n", b"\n").strip(b"\r\n")) if rest.strip() else None
        if last is None:
            raise StopAsyncIteration
        return last

    def _keep(self, piece: bytes) -> None:
        self._partial.append(piece)
        self._partial_bytes += len(piece)
        if self._partial_bytes > self._max:
            raise InvalidEvent(f"an event larger than the limit of {self._max} bytes")

    def _split(self, buffer: bytes) -> None:
        if buffer.find(b"\r") >= 0:
            buffer = buffer.replace(b"\r\n", b"\n")
        blocks = buffer.split(b"\n\n")
        rest = blocks.pop()
        if len(buffer) > self._max and any(len(block) > self._max for block in blocks):
            raise InvalidEvent(f"an event larger than the limit of {self._max} bytes")
        for block in blocks:
            parsed = _parse_block(block)
            if parsed is not None:
                self._events.append(parsed)
        if rest:
            self._keep(rest)
