"""One request's facts as the pipeline learns them; becomes the inference record at the end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.inference.ids import uuid7
from gateway.providers import Usage


@dataclass(slots=True)
class Exchange:
    endpoint: str
    op: str = "chat"
    request_id: str = field(default_factory=uuid7)
    ts: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    key_id: str = ""
    user: str = ""
    groups: tuple[str, ...] = ()
    route: str = ""
    priority: int = 0
    provider: str = ""
    model: str = ""
    status: int = 200
    error_type: str = ""
    error_code: str = ""
    streamed: bool = False
    usage: Usage | None = None
    cost_micro_usd: int = 0
    cache_savings_micro_usd: int = 0
    # The prompt tokens the gateway counted at admission (None: it did not count), so settle charges the difference
    # when the upstream counts more.
    counted_prompt_tokens: int | None = None
    # The answer's text when it came without usage (a long one's first part), and its whole length in characters:
    # what the gateway counts its completion tokens from.
    answer_text: str | None = None
    answer_chars: int = 0
    first_byte_at: float = 0.0
    upstream_s: float = 0.0
    attempts: int = 0
    fallbacks: list[str] = field(default_factory=list)
    split_arm: str = ""
    guardrail_findings: list[dict] = field(default_factory=list)
    guardrail_action: str = ""
    ratelimit_outcome: str = "ok"
    metadata: dict[str, str] = field(default_factory=dict)
    request_payload: object = None
    response_payload: object = None
    policy_version: str = ""
    is_shadow: bool = False
    shadow_of: str = ""
    # The route's guardrails read the stored request (answer) whole and found nothing: masking it would change nothing.
    request_clean: bool = False
    response_clean: bool = False

    def record(self, finished: float) -> dict:
        latency = finished - self.started
        usage = self.usage or Usage()
        return {
            "request_id": self.request_id,
            "ts": self.ts,
            "key_id": self.key_id,
            "user": self.user,
            "groups": list(self.groups),
            "route": self.route,
            "provider": self.provider,
            "model": self.model,
            "endpoint": self.endpoint,
            "status": self.status,
            "error_type": self.error_type,
            "error_code": self.error_code,
            "streamed": self.streamed,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cached_tokens": usage.cached_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
            "cache_write_1h_tokens": usage.cache_write_1h_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
            "usage_estimated": usage.estimated,
            "cost_micro_usd": self.cost_micro_usd,
            "cache_savings_micro_usd": self.cache_savings_micro_usd,
            "latency_ms": latency * 1000,
            "ttft_ms": (self.first_byte_at - self.started) * 1000 if self.first_byte_at else 0.0,
            "upstream_ms": self.upstream_s * 1000,
            "overhead_ms": max(latency - self.upstream_s, 0.0) * 1000,
            "attempts": self.attempts,
            "fallbacks": self.fallbacks,
            "split_arm": self.split_arm,
            "guardrail_findings": self.guardrail_findings,
            "guardrail_action": self.guardrail_action,
            "ratelimit_outcome": self.ratelimit_outcome,
            "metadata": self.metadata,
            "request_payload": self.request_payload,
            "response_payload": self.response_payload,
            "policy_version": self.policy_version,
            "is_shadow": self.is_shadow,
            "shadow_of": self.shadow_of,
        }
