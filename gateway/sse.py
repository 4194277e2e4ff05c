"""Server-sent events: reading an upstream's event stream, writing ours."""

from __future__ import annotations

from collections import deque
from typing import Protocol

import orjson

DONE = b"data: [DONE]\n\n"


def event(data: object) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class ByteSource(Protocol):
    async def readany(self) -> bytes:
        """Whatever bytes have arrived, waiting for some if none have; b"" at the end."""
        ...


def _parse_block(block: bytes) -> tuple[str, bytes] | None:
    if block.startswith(b"data: ") and b"\n" not in block:
        return "", block[6:]
    name = ""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode()
    return (name, b"\n".join(data)) if data else None


class EventReader:
    """Parses SSE from whatever bytes have arrived, rather than line by line.

    Reading per line costs two reads per event and wakes the transport each time; reading what is
    there and splitting on blank lines costs one. `has_buffered` tells a relay that more events are
    already parsed, so it can send them in one write.
    """

    def __init__(self, content: ByteSource) -> None:
        self._content = content
        self._rest = b""
        self._events: deque[tuple[str, bytes]] = deque()

    def has_buffered(self) -> bool:
        return bool(self._events)

    def __aiter__(self) -> EventReader:
        return self

    async def __anext__(self) -> tuple[str, bytes]:
        while not self._events:
            data = await self._content.readany()
            if not data:
                last = _parse_block(self._rest.strip(b"\r\n")) if self._rest.strip() else None
                self._rest = b""
                if last is None:
                    raise StopAsyncIteration
                return last
            self._split(self._rest + data)
        return self._events.popleft()

    def _split(self, buffer: bytes) -> None:
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        blocks = buffer.split(b"\n\n")
        self._rest = blocks.pop()
        for block in blocks:
            parsed = _parse_block(block)
            if parsed is not None:
                self._events.append(parsed)
