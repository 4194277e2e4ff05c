"""Records as bytes: the form a batch takes on the pipe to the writer process and in a spool file.

A batch is a sequence of frames; a frame is one JSON array of records, serialized by one orjson call.
Frames stay small so that no single call holds the GIL for long in the gateway's process.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import orjson

FRAME_ROWS = 256
_OPTIONS = orjson.OPT_NON_STR_KEYS


def _fallback(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def _plain(record: Any) -> dict[str, Any]:
    """A record orjson refused whole (an int beyond 64 bits, a cycle): each bad value becomes its str()."""
    if not isinstance(record, dict):
        return {"request_id": str(record)}
    plain: dict[str, Any] = {}
    for key, value in record.items():
        try:
            orjson.dumps(value, default=_fallback, option=_OPTIONS)
            plain[str(key)] = value
        except (TypeError, orjson.JSONEncodeError):
            plain[str(key)] = str(value)
    return plain


def encode_frame(records: Sequence[Any]) -> bytes:
    try:
        return orjson.dumps(records, default=_fallback, option=_OPTIONS)
    except (TypeError, orjson.JSONEncodeError):
        return orjson.dumps([_plain(record) for record in records], default=_fallback, option=_OPTIONS)


def decode_frames(frames: Iterable[bytes]) -> list[dict[str, Any]]:
    """Records from frames or from lines of a spool file, where a line is a frame or (older files) one record."""
    records: list[dict[str, Any]] = []
    for frame in frames:
        if not frame.strip():
            continue
        value = orjson.loads(frame)
        if isinstance(value, list):
            records.extend(value)
        else:
            records.append(value)
    return records
