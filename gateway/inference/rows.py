"""Turns the gateway's per-request record (a plain dict) into one typed row of the inference table."""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.inference.wire import PAYLOAD_MARKER, safe_text, unencodable_reason

COLUMNS: tuple[str, ...] = (
    "request_id", "ts", "key_id", "user", "groups", "route", "provider", "model", "endpoint", "status",
    "error_type", "error_code", "streamed", "prompt_tokens", "completion_tokens", "cached_tokens",
    "cache_write_tokens", "cache_write_1h_tokens", "reasoning_tokens", "usage_estimated", "cost_micro_usd",
    "cache_savings_micro_usd", "latency_ms", "ttft_ms", "upstream_ms", "overhead_ms", "attempts", "fallbacks",
    "split_arm", "guardrail_findings", "guardrail_action", "ratelimit_outcome", "metadata",
    "request_payload", "response_payload", "payload_truncated", "policy_version", "is_shadow", "shadow_of",
)

_UINT32 = 2**32 - 1
TRUNCATION_MARKER = "...[truncated by lockgate: {size} bytes]"
# DateTime64's last second (2299-12-31 23:59:59 UTC): a later timestamp would not insert.
_MAX_TS = 10_413_791_999.0
ROW_MARKER = "[payload not stored: the record could not be turned into a row]"


def _uint(value: Any, limit: int) -> int:
    if type(value) is int and 0 <= value <= limit:
        return value
    try:
        number = int(value or 0)
    except (TypeError, ValueError, OverflowError):
        return 0
    return min(max(number, 0), limit)


def _float(value: Any) -> float:
    try:
        number = float(value or 0.0)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return number if number == number and number >= 0.0 else 0.0


def _timestamp(value: Any) -> datetime:
    try:
        seconds = float(value or 0.0)
    except (TypeError, ValueError, OverflowError):
        seconds = 0.0
    seconds = min(max(seconds, 0.0), _MAX_TS) if seconds == seconds else 0.0
    return datetime.fromtimestamp(seconds, UTC)


def _texts(value: Any) -> list[str]:
    if type(value) is list:
        return [item if type(item) is str else str(item) for item in value]
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Iterable) or isinstance(value, Mapping):
        return []
    return [str(item) for item in value]


def truncate_payload(payload: str, max_bytes: int) -> tuple[str, bool]:
    """Cut a payload to at most max_bytes UTF-8 bytes, marker included, the way Databricks flags oversize ones."""
    encoded = payload.encode("utf-8", "replace")
    if len(encoded) <= max_bytes:
        return payload, False
    marker = TRUNCATION_MARKER.format(size=len(encoded))
    keep = max(max_bytes - len(marker.encode()), 0)
    return encoded[:keep].decode("utf-8", "ignore") + marker, True


def payload_text(payload: Any) -> str:
    """A payload as stored: text as it is, bytes decoded as UTF-8, anything else (a dict, a list) as JSON."""
    if payload is None:
        return ""
    if isinstance(payload, str):
        return payload
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload).decode("utf-8", "replace")
    try:
        return orjson.dumps(payload, default=safe_text, option=orjson.OPT_NON_STR_KEYS).decode()
    except Exception as error:
        return PAYLOAD_MARKER.format(reason=unencodable_reason(error)[1])


def _findings(raw: Any) -> list[tuple[str, str, str, int]]:
    if not isinstance(raw, Iterable):
        return []
    out = []
    for finding in raw:
        if type(finding) is dict or isinstance(finding, Mapping):
            out.append((
                str(finding.get("direction", "")), str(finding.get("entity", "")),
                str(finding.get("action", "")), _uint(finding.get("count", 1), 2**32 - 1),
            ))
    return out


def _stored_payload(payload: Any, log_payloads: bool, max_bytes: int) -> tuple[str, bool]:
    if not log_payloads:
        return truncate_payload("", max_bytes)
    if type(payload) is bytes:
        # Text that travelled apart from its record: valid UTF-8 that fits is stored as it came.
        if len(payload) <= max_bytes:
            try:
                return payload.decode(), False
            except UnicodeDecodeError:
                pass
        return truncate_payload(payload.decode("utf-8", "replace"), max_bytes)
    if type(payload) is dict:
        # A payload as JSON that fits is decoded once, instead of decoded to be measured by encoding it again.
        try:
            encoded = orjson.dumps(payload, default=safe_text, option=orjson.OPT_NON_STR_KEYS)
        except Exception:
            encoded = None
        if encoded is not None and len(encoded) <= max_bytes:
            return encoded.decode(), False
    return truncate_payload(payload_text(payload), max_bytes)


def _text(value: Any) -> str:
    return value if type(value) is str else str(value or "")


def _metadata(metadata: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, Mapping) else {}


def to_row(record: Mapping[str, Any], *, log_payloads: bool, max_payload_bytes: int) -> list[Any]:
    """One row in COLUMNS order; missing or malformed fields become empty values, never a failed batch."""
    get = record.get
    metadata = get("metadata")
    request_payload, request_cut = _stored_payload(get("request_payload"), log_payloads, max_payload_bytes)
    response_payload, response_cut = _stored_payload(get("response_payload"), log_payloads, max_payload_bytes)
    # One pass in COLUMNS order: this runs for every row the writer inserts.
    return [
        _text(get("request_id")), _timestamp(get("ts")), _text(get("key_id")), _text(get("user")),
        _texts(get("groups")), _text(get("route")), _text(get("provider")), _text(get("model")),
        _text(get("endpoint")), _uint(get("status"), 65_535), _text(get("error_type")), _text(get("error_code")),
        bool(get("streamed")), _uint(get("prompt_tokens"), _UINT32), _uint(get("completion_tokens"), _UINT32),
        _uint(get("cached_tokens"), _UINT32), _uint(get("cache_write_tokens"), _UINT32),
        _uint(get("cache_write_1h_tokens"), _UINT32), _uint(get("reasoning_tokens"), _UINT32),
        bool(get("usage_estimated")), _uint(get("cost_micro_usd"), 2**64 - 1),
        _uint(get("cache_savings_micro_usd"), 2**64 - 1), _float(get("latency_ms")),
        _float(get("ttft_ms")), _float(get("upstream_ms")), _float(get("overhead_ms")), _uint(get("attempts"), 255),
        _texts(get("fallbacks")), _text(get("split_arm")), _findings(get("guardrail_findings")),
        _text(get("guardrail_action")), _text(get("ratelimit_outcome")),
        _metadata(metadata),
        request_payload, response_payload, request_cut or response_cut, _text(get("policy_version")),
        bool(get("is_shadow")), _text(get("shadow_of")),
    ]


def safe_row(record: Any, *, log_payloads: bool, max_payload_bytes: int) -> tuple[list[Any], bool]:
    """The record's row and True, or, when it cannot be typed at all, a row of its request id, time and a marker."""
    try:
        return to_row(record, log_payloads=log_payloads, max_payload_bytes=max_payload_bytes), True
    except Exception:
        request_id = record.get("request_id") if isinstance(record, Mapping) else record
        ts = record.get("ts") if isinstance(record, Mapping) else None
        marker = ROW_MARKER if log_payloads else ""
        bare = {"request_id": safe_text(request_id), "ts": ts if isinstance(ts, int | float | str) else None,
                "request_payload": marker}
        return to_row(bare, log_payloads=log_payloads, max_payload_bytes=max_payload_bytes), False


_TEXT, _TIME, _TEXTS, _UINT, _BOOL, _FLOAT, _FINDINGS, _MAP, _PAYLOAD, _CUT = range(10)
# Each column's kind (and an integer's upper bound), in COLUMNS order.
_KINDS: tuple[tuple[str, int, int], ...] = tuple((name, *kind) for name, kind in zip(COLUMNS, (
    (_TEXT, 0), (_TIME, 0), (_TEXT, 0), (_TEXT, 0), (_TEXTS, 0), (_TEXT, 0), (_TEXT, 0), (_TEXT, 0), (_TEXT, 0),
    (_UINT, 65_535), (_TEXT, 0), (_TEXT, 0), (_BOOL, 0), *[(_UINT, _UINT32)] * 6, (_BOOL, 0), (_UINT, 2**64 - 1),
    (_UINT, 2**64 - 1), *[(_FLOAT, 0)] * 4, (_UINT, 255), (_TEXTS, 0), (_TEXT, 0), (_FINDINGS, 0), (_TEXT, 0),
    (_TEXT, 0), (_MAP, 0), (_PAYLOAD, 0), (_PAYLOAD, 0), (_CUT, 0), (_TEXT, 0), (_BOOL, 0), (_TEXT, 0),
), strict=True))


_CUT_INDEX = COLUMNS.index("payload_truncated")
_RECORD_FIELDS = operator.itemgetter(*(name for name in COLUMNS if name != "payload_truncated"))


def to_columns(records: Sequence[Mapping[str, Any]], *, log_payloads: bool,
               max_payload_bytes: int) -> tuple[list[list[Any]], list[str]]:
    """The batch as columns in COLUMNS order (the rows safe_row makes, pivoted), and the request ids of the records
    that could not be typed.

    Column by column, a value that already has its column's type passes one test and is taken as it is; any
    other goes through to_row's converter. A batch with a record to_row cannot type is built row by row instead.
    """
    try:
        return _columns(records, log_payloads, max_payload_bytes), []
    except Exception:
        pass
    rows: list[list[Any]] = []
    untypable: list[str] = []
    for record in records:
        row, typed = safe_row(record, log_payloads=log_payloads, max_payload_bytes=max_payload_bytes)
        rows.append(row)
        if not typed:
            untypable.append(row[0])
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in COLUMNS], untypable


def _columns(records: Sequence[Mapping[str, Any]], log_payloads: bool, max_bytes: int) -> list[list[Any]]:
    if not records:
        return [[] for _ in COLUMNS]
    try:
        # A record as the gateway makes it has every field: read and pivoted in C, then each column in one sweep.
        table: list[tuple[Any, ...]] | None = list(zip(*map(_RECORD_FIELDS, records), strict=True))
    except KeyError:
        table = None
    columns: list[list[Any]] = []
    stored: list[list[tuple[str, bool]]] = []
    for index, (name, kind, limit) in enumerate(_KINDS):
        if kind == _CUT:
            values: Sequence[Any] = ()
        elif table is not None:
            values = table[index if index < _CUT_INDEX else index - 1]
        else:
            values = [record.get(name) for record in records]
        if kind == _TEXT:
            column: list[Any] = [v if type(v) is str else _text(v) for v in values]
        elif kind == _UINT:
            column = [v if type(v) is int and 0 <= v <= limit else _uint(v, limit) for v in values]
        elif kind == _FLOAT:
            column = [v if type(v) is float and v > 0.0 else _float(v) for v in values]
        elif kind == _BOOL:
            column = [v if type(v) is bool else bool(v) for v in values]
        elif kind == _TIME:
            column = [datetime.fromtimestamp(v, UTC) if type(v) is float and 0.0 < v <= _MAX_TS else _timestamp(v)
                      for v in values]
        elif kind == _TEXTS:
            column = [_texts(v) for v in values]
        elif kind == _FINDINGS:
            column = [[] if type(v) is list and not v else _findings(v) for v in values]
        elif kind == _MAP:
            column = [{} if type(v) is dict and not v else _metadata(v) for v in values]
        elif kind == _PAYLOAD:
            payloads = [_stored_payload(v, log_payloads, max_bytes) for v in values]
            stored.append(payloads)
            column = [text for text, _ in payloads]
        else:
            column = [a[1] or b[1] for a, b in zip(*stored, strict=True)]
        columns.append(column)
    return columns


def batch_token(records: Iterable[Mapping[str, Any]]) -> str:
    """A dedup token that is the same every time this exact batch is (re)inserted."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(str(record.get("request_id", "")).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]
