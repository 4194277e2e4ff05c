"""Records as bytes: the form a batch takes on the pipe to the writer process and in a spool file.

A batch is a sequence of frames of at most 64 records, so that no single orjson call holds the GIL for long in the
gateway's process. A frame is one JSON array of records; or, when payloads travel apart (format 2), the byte 0x01,
the array's length (uint32, little-endian), the array with those payloads left out, two signed 64-bit lengths a
record (request and response payload; -1: in the record, or none), and the payloads' JSON text back to back. The
writer process stores that text as it gets it: it neither parses the payloads nor encodes them again. Payloads that
are bytes (the upstream's answer body) are not even encoded here. On the pipe, every message is length-prefixed as
multiprocessing's Connection does it, so the gateway's side keeps using one.

Encoding never fails: a record orjson refuses is encoded field by field, a payload that cannot be encoded is
replaced by a marker naming the reason, and any other bad value becomes text, so the row is still written.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson

# One orjson call holds the GIL throughout: 64 records with their payloads take well under a millisecond, so the
# event loop never waits long for the writer's thread (256 took 1-3 ms).
FRAME_ROWS = 64
PAYLOADS = ("request_payload", "response_payload")
PAYLOAD_MARKER = "[payload not stored: {reason}]"
VALUE_MARKER = "[value not stored: {reason}]"
_OPTIONS = orjson.OPT_NON_STR_KEYS
# orjson's messages, in the words a row's marker uses; the label is the metric's `reason`.
_REASONS = (
    ("Recursion limit", "too_deep", "nested deeper than 255 levels"),
    ("Integer exceeds", "integer_out_of_range", "an integer beyond 64 bits"),
    ("not valid UTF-8", "invalid_utf8", "text that is not valid UTF-8"),
    ("Dict key", "bad_key", "an object key that is not text"),
)
UNSERIALIZABLE = ("unserializable", "a value that cannot be written as JSON")
NOT_A_RECORD = "not_a_record"
# Connection's prefix: a signed 32-bit length, or -1 and then an unsigned 64-bit one.
_LENGTH = struct.Struct("!i")
_LONG_LENGTH = struct.Struct("!Q")
SPLIT_FRAME = b"\x01"
_SPLIT_HEAD = struct.Struct("<cI")
_PAYLOAD_LENGTH = 8
# A payload nested deeper than 253 levels cannot sit in a format-1 frame (orjson stops at 255), and is replaced by
# a marker: one whose text holds fewer brackets than this is surely shallower. A deeper-looking one is encoded again
# inside a list and an object, as it sits in a frame, and its text taken from between `[{"":` and `}]`.
_SURELY_SHALLOW = 200
_WRAPPED_PREFIX, _WRAPPED_SUFFIX = len(b'[{"":'), len(b"}]")

# Called with the reason label and the request id once for each record the fallback path had to alter.
OnUnencodable = Callable[[str, str], None]


def safe_text(value: Any) -> str:
    """str(value) that cannot raise and is valid UTF-8."""
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:
        return f"<{type(value).__name__} that cannot be shown>"
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode()
    return text


def _fallback(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, set | frozenset):
        return list(value)
    return safe_text(value)


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_fallback, option=_OPTIONS)


def unencodable_reason(error: Exception) -> tuple[str, str]:
    message = str(error)
    for fragment, label, words in _REASONS:
        if fragment in message:
            return label, words
    return UNSERIALIZABLE


def _encode_field(name: str, value: Any) -> tuple[bytes, str | None]:
    """`"name":value` as JSON, or with a replacement value and the reason label.

    Encoded inside an object inside a list, as it sits in a frame, so that the depth limit counts the same.
    """
    try:
        return _dumps([{name: value}])[2:-2], None
    except Exception as error:
        label, words = unencodable_reason(error)
    if name in PAYLOADS and not isinstance(value, str):
        replacement: Any = PAYLOAD_MARKER.format(reason=words)
    else:
        replacement = _coerced(value, words)
    return _dumps({name: replacement})[1:-1], label


def _coerced(value: Any, words: str) -> Any:
    """A value orjson refused, made writable: text as text, and a mapping or list item by item, one level deep."""
    if isinstance(value, str | int) and not isinstance(value, bool):
        return safe_text(value)
    try:
        if isinstance(value, dict):
            return {safe_text(key): _item(item) for key, item in list(value.items())}
        if isinstance(value, list | tuple | set | frozenset):
            return [_item(item) for item in list(value)]
    except Exception:
        pass
    return VALUE_MARKER.format(reason=words)


def _item(value: Any) -> Any:
    try:
        # Inside the frame's list, the record and the field: as deep as it sits in the frame.
        _dumps([{"": {"": value}}])
        return value
    except Exception as error:
        if isinstance(value, str | int) and not isinstance(value, bool):
            return safe_text(value)
        return VALUE_MARKER.format(reason=unencodable_reason(error)[1])


def _encode_record(record: Any, on_unencodable: OnUnencodable | None) -> bytes:
    try:
        return _dumps([record])[1:-1]
    except Exception:
        pass
    if not isinstance(record, dict):
        if on_unencodable is not None:
            on_unencodable(NOT_A_RECORD, "")
        return _dumps({"request_id": safe_text(record)})
    fields: list[bytes] = []
    first_reason: str | None = None
    for key, value in list(record.items()):
        encoded, reason = _encode_field(safe_text(key), value)
        first_reason = first_reason or reason
        fields.append(encoded)
    if first_reason is not None and on_unencodable is not None:
        on_unencodable(first_reason, safe_text(record.get("request_id")))
    return b"{" + b",".join(fields) + b"}"


def _encode_any(record: Any, on_unencodable: OnUnencodable | None) -> bytes:
    try:
        return _encode_record(record, on_unencodable)
    except Exception:
        # A record that even field by field cannot be read (a mapping whose items() raises): its id, if any.
        request_id = dict.get(record, "request_id") if isinstance(record, dict) else None
        if on_unencodable is not None:
            on_unencodable(UNSERIALIZABLE[0], safe_text(request_id))
        return _dumps({"request_id": safe_text(request_id),
                       "request_payload": PAYLOAD_MARKER.format(reason=UNSERIALIZABLE[1])})


def payload_json(payload: Any) -> bytes | memoryview | None:
    """The text a payload is stored as, as UTF-8: bytes as they are, text encoded, a dict or list as JSON.

    None for anything else (and for what this cannot encode): it then travels inside its record, where the
    record's encoding and the writer treat it as they always did, so that the stored text is the same either way.
    Without OPT_NON_STR_KEYS: a key 1 next to a key "1" would be two keys here and one after the record's way.
    """
    kind = type(payload)
    if kind is bytes:
        return payload
    if kind is dict or kind is list:
        try:
            text = orjson.dumps(payload, default=_fallback)
            if text.count(b"[") + text.count(b"{") < _SURELY_SHALLOW:
                return text
            wrapped = orjson.dumps([{"": payload}], default=_fallback)
        except Exception:
            return None
        return memoryview(wrapped)[_WRAPPED_PREFIX:-_WRAPPED_SUFFIX]
    if kind is str:
        try:
            return payload.encode()
        except UnicodeEncodeError:
            return None
    if kind is bytearray or kind is memoryview:
        return bytes(payload)
    return None


# One record as a frame holds it: its JSON (without the payloads that travel apart) and those payloads' text.
Piece = tuple[bytes, bytes | memoryview | None, bytes | memoryview | None]


def record_piece(record: Any, on_unencodable: OnUnencodable | None = None) -> Piece:
    """A record encoded for a frame; never raises for a record. Its JSON is what it would be inside the frame's array."""
    if type(record) is not dict:
        return _encode_any(record, on_unencodable), None, None
    meta = record
    texts: list[bytes | memoryview | None] = []
    for name in PAYLOADS:
        payload = record.get(name)
        text = None if payload is None else payload_json(payload)
        if text is not None:
            if meta is record:
                meta = record.copy()
            meta[name] = None
        texts.append(text)
    return _encode_any(meta, on_unencodable), texts[0], texts[1]


def frame_of(pieces: Sequence[Piece]) -> bytes:
    """One frame of encoded records: their payloads apart (format 2) when any has one, else the plain array."""
    array = b"[" + b",".join([piece[0] for piece in pieces]) + b"]"
    payloads = [text for piece in pieces for text in piece[1:] if text is not None]
    if not payloads:
        return array
    lengths = [-1 if text is None else len(text) for piece in pieces for text in piece[1:]]
    return b"".join((_SPLIT_HEAD.pack(SPLIT_FRAME, len(array)), array, struct.pack(f"<{len(lengths)}q", *lengths),
                     *payloads))


def piece_bytes(piece: Piece) -> int:
    return len(piece[0]) + sum(len(text) for text in piece[1:] if text is not None)


def encode_frame(records: Sequence[Any], on_unencodable: OnUnencodable | None = None) -> bytes:
    """One frame; its payloads apart (format 2) when any can be, else the plain array. Never raises for a record."""
    return frame_of([record_piece(record, on_unencodable) for record in records])


def _split_records(frame: bytes) -> list[Any]:
    """A format-2 frame's records with their payloads (bytes); ValueError for one that does not add up."""
    end = _SPLIT_HEAD.size + _SPLIT_HEAD.unpack_from(frame)[1]
    records = orjson.loads(memoryview(frame)[_SPLIT_HEAD.size:end])
    if not isinstance(records, list):
        raise ValueError("a frame whose records are not an array")
    records = [record if isinstance(record, dict) else {"request_id": safe_text(record)} for record in records]
    position = end + _PAYLOAD_LENGTH * 2 * len(records)
    if position > len(frame):
        raise ValueError("a frame cut short in its payload lengths")
    lengths = struct.unpack_from(f"<{2 * len(records)}q", frame, end)
    for index, length in enumerate(lengths):
        if length < 0:
            continue
        if position + length > len(frame):
            raise ValueError("a frame cut short in its payloads")
        records[index >> 1][PAYLOADS[index & 1]] = frame[position:position + length]
        position += length
    if position != len(frame):
        raise ValueError("a frame with bytes past its payloads")
    return records


def decode_frames(frames: Iterable[bytes]) -> list[dict[str, Any]]:
    """Records from frames or from lines of a format-1 spool file, where a line is a frame or (older files) one record.

    A value that is not an object (only a damaged file has one) becomes a record carrying it as its request id.
    Payloads that travelled apart are bytes in the record: their stored text as UTF-8. ValueError for a damaged frame.
    """
    records: list[dict[str, Any]] = []
    for frame in frames:
        if frame[:1] == SPLIT_FRAME:
            if len(frame) < _SPLIT_HEAD.size:
                raise ValueError("a frame cut short in its head")
            records += _split_records(frame)
            continue
        if not frame.strip():
            continue
        value = orjson.loads(frame)
        for record in value if isinstance(value, list) else [value]:
            records.append(record if isinstance(record, dict) else {"request_id": safe_text(record)})
    return records


def framed_head(size: int) -> bytes:
    """The length prefix Connection.send_bytes puts before a message of `size` bytes."""
    if size > 0x7FFFFFFF:
        return _LENGTH.pack(-1) + _LONG_LENGTH.pack(size)
    return _LENGTH.pack(size)


def framed(message: bytes) -> bytes:
    """One message as Connection.send_bytes puts it on the wire, for its recv_bytes on the other end."""
    return framed_head(len(message)) + message


class MessageReader:
    """Cuts a byte stream into Connection's messages as it arrives, so a reader serving several peers never blocks
    on one that sent half a message."""

    def __init__(self, max_bytes: int) -> None:
        self._buffer = bytearray()
        self._max_bytes = max_bytes

    def feed(self, data: bytes) -> list[bytes]:
        """The messages `data` completes; ValueError for a length beyond max_bytes (the stream cannot be trusted)."""
        buffer = self._buffer
        buffer += data
        messages: list[bytes] = []
        start = 0
        while len(buffer) - start >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer, start)
            header = _LENGTH.size
            if size == -1:
                if len(buffer) - start < header + _LONG_LENGTH.size:
                    break
                (size,) = _LONG_LENGTH.unpack_from(buffer, start + header)
                header += _LONG_LENGTH.size
            if not 0 <= size <= self._max_bytes:
                raise ValueError(f"a message of {size} bytes (at most {self._max_bytes})")
            if len(buffer) - start < header + size:
                break
            messages.append(bytes(buffer[start + header:start + header + size]))
            start += header + size
        del buffer[:start]
        return messages
