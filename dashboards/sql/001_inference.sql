-- One row per request through the gateway. ReplacingMergeTree on the full sorting key (which ends in
-- request_id) is the second line of replay dedup; the first is insert_deduplication_token per batch.
CREATE TABLE IF NOT EXISTS {database}.inference
(
    request_id         String,
    ts                 DateTime64(3, 'UTC'),
    key_id             LowCardinality(String),
    user               LowCardinality(String),
    groups             Array(LowCardinality(String)),
    route              LowCardinality(String),
    provider           LowCardinality(String),
    model              LowCardinality(String),
    endpoint           LowCardinality(String),
    status             UInt16,
    error_type         LowCardinality(String),
    error_code         LowCardinality(String),
    streamed           Bool,
    prompt_tokens      UInt32,
    completion_tokens  UInt32,
    cached_tokens      UInt32,
    cost_micro_usd     UInt64,
    latency_ms         Float32,
    ttft_ms            Float32,
    upstream_ms        Float32,
    overhead_ms        Float32,
    attempts           UInt8,
    fallbacks          Array(String),
    split_arm          LowCardinality(String),
    guardrail_findings Array(Tuple(direction LowCardinality(String), entity LowCardinality(String),
                                   action LowCardinality(String), count UInt32)),
    guardrail_action   LowCardinality(String),
    ratelimit_outcome  LowCardinality(String),
    metadata           Map(LowCardinality(String), String),
    request_payload    String CODEC(ZSTD(3)) TTL toDateTime(ts) + toIntervalDay({payload_ttl_days}),
    response_payload   String CODEC(ZSTD(3)) TTL toDateTime(ts) + toIntervalDay({payload_ttl_days}),
    payload_truncated  Bool,
    policy_version     LowCardinality(String),
    is_shadow          Bool,
    shadow_of          String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (route, user, ts, request_id)
SETTINGS non_replicated_deduplication_window = 10000;
