"""Sample records and row counts for the inference-table tests."""

import time
import uuid
from typing import Any

from gateway.inference import InferenceWriter


def make_record(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "request_id": str(uuid.uuid4()), "ts": time.time(), "key_id": "key-1", "user": "alice",
        "groups": ["eng"], "route": "chat-default", "provider": "openai", "model": "gpt-4o-mini",
        "endpoint": "chat", "status": 200, "error_type": "", "error_code": "", "streamed": False,
        "prompt_tokens": 12, "completion_tokens": 30, "cached_tokens": 0, "cost_micro_usd": 25,
        "latency_ms": 120.5, "ttft_ms": 0.0, "upstream_ms": 118.0, "overhead_ms": 2.5, "attempts": 1,
        "fallbacks": [], "split_arm": "openai/gpt-4o-mini", "guardrail_findings": [], "guardrail_action": "",
        "ratelimit_outcome": "ok", "metadata": {"team": "search"},
        "request_payload": '{"messages":[{"role":"user","content":"hi"}]}', "response_payload": '{"choices":[]}',
        "policy_version": "abc123", "is_shadow": False, "shadow_of": "",
    }
    record.update(overrides)
    return record


def count_rows(writer: InferenceWriter) -> tuple[int, int]:
    """(rows, distinct request ids) in the raw table, without FINAL: duplicates would show."""
    return writer.query(f"SELECT count(), uniqExact(request_id) FROM {writer.database}.inference")[0]


def rollup_requests(writer: InferenceWriter) -> int:
    return writer.query(f"SELECT sum(requests) FROM {writer.database}.requests_1m")[0][0]
