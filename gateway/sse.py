"""Server-sent events: reading an upstream's event stream, writing ours."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import orjson

DONE = b"data: [DONE]\n\n"


def event(data: object) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def read_events(content: aiohttp.StreamReader) -> AsyncIterator[tuple[str, bytes]]:
    """Yields (event name, data) for each SSE event; multi-line data is joined with newlines."""
    name = ""
    data: list[bytes] = []
    async for raw in content:
        line = raw.rstrip(b"\r\n")
        if not line:
            if data:
                yield name, b"\n".join(data)
            name, data = "", []
        elif line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode()
    if data:
        yield name, b"\n".join(data)
