"""Turns the gateway's per-request record (a plain dict) into one typed row of the inference table."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.inference.wire import PAYLOAD_MARKER, safe_text, unencodable_reason

COLUMNS: tuple[str, ...] = (
    "request_id", "ts", "key_id", "user", "groups", "route", "provider", "model", "endpoint", "status",
    "error_type", "error_code", "streamed", "prompt_tokens", "completion_tokens", "cached_tokens",
    "cost_micro_usd", "latency_ms", "ttft_ms", "upstream_ms", "overhead_ms", "attempts", "fallbacks",
    "split_arm", "guardrail_findings", "guardrail_action", "ratelimit_outcome", "metadata",
    "request_payload", "response_payload", "payload_truncated", "policy_version", "is_shadow", "shadow_of",
)

_STRINGS = (
    "request_id", "key_id", "user", "route", "provider", "model", "endpoint", "error_type", "error_code",
    "split_arm", "guardrail_action", "ratelimit_outcome", "policy_version", "shadow_of",
)
_UINT_LIMITS = {
    "prompt_tokens": 2**32 - 1, "completion_tokens": 2**32 - 1, "cached_tokens": 2**32 - 1,
    "cost_micro_usd": 2**64 - 1, "attempts": 255, "status": 65_535,
}
_FLOATS = ("latency_ms", "ttft_ms", "upstream_ms", "overhead_ms")
TRUNCATION_MARKER = "...[truncated by lockgate: {size} bytes]"
# DateTime64's last second (2299-12-31 23:59:59 UTC): a later timestamp would not insert.
_MAX_TS = 10_413_791_999.0
ROW_MARKER = "[payload not stored: the record could not be turned into a row]"


def _uint(value: Any, limit: int) -> int:
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
        if isinstance(finding, Mapping):
            out.append((
                str(finding.get("direction", "")), str(finding.get("entity", "")),
                str(finding.get("action", "")), _uint(finding.get("count", 1), 2**32 - 1),
            ))
    return out


def to_row(record: Mapping[str, Any], *, log_payloads: bool, max_payload_bytes: int) -> list[Any]:
    """One row in COLUMNS order; missing or malformed fields become empty values, never a failed batch."""
    values: dict[str, Any] = {name: str(record.get(name) or "") for name in _STRINGS}
    values.update({name: _uint(record.get(name), limit) for name, limit in _UINT_LIMITS.items()})
    values.update({name: _float(record.get(name)) for name in _FLOATS})
    values["ts"] = _timestamp(record.get("ts"))
    values["groups"] = _texts(record.get("groups"))
    values["fallbacks"] = _texts(record.get("fallbacks"))
    values["streamed"] = bool(record.get("streamed"))
    values["is_shadow"] = bool(record.get("is_shadow"))
    values["guardrail_findings"] = _findings(record.get("guardrail_findings"))
    metadata = record.get("metadata")
    values["metadata"] = {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, Mapping) else {}
    truncated = False
    for name in ("request_payload", "response_payload"):
        payload = payload_text(record.get(name)) if log_payloads else ""
        values[name], cut = truncate_payload(payload, max_payload_bytes)
        truncated = truncated or cut
    values["payload_truncated"] = truncated
    return [values[name] for name in COLUMNS]


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


def batch_token(records: Iterable[Mapping[str, Any]]) -> str:
    """A dedup token that is the same every time this exact batch is (re)inserted."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(str(record.get("request_id", "")).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]
