-- Per-minute roll-up fed on insert, so dashboards over months read minutes, not requests.
-- Every dimension is in the sorting key: AggregatingMergeTree merges rows with equal keys.
CREATE TABLE IF NOT EXISTS {database}.requests_1m
(
    minute             DateTime('UTC'),
    route              LowCardinality(String),
    model              LowCardinality(String),
    user               LowCardinality(String),
    groups             Array(LowCardinality(String)),
    provider           LowCardinality(String),
    split_arm          LowCardinality(String),
    key_id             LowCardinality(String),
    endpoint           LowCardinality(String),
    is_shadow          Bool,
    requests           SimpleAggregateFunction(sum, UInt64),
    errors             SimpleAggregateFunction(sum, UInt64),
    server_errors      SimpleAggregateFunction(sum, UInt64),
    ratelimited        SimpleAggregateFunction(sum, UInt64),
    blocked            SimpleAggregateFunction(sum, UInt64),
    streamed_requests  SimpleAggregateFunction(sum, UInt64),
    prompt_tokens      SimpleAggregateFunction(sum, UInt64),
    completion_tokens  SimpleAggregateFunction(sum, UInt64),
    cached_tokens      SimpleAggregateFunction(sum, UInt64),
    cost_micro_usd     SimpleAggregateFunction(sum, UInt64),
    latency_sum_ms     SimpleAggregateFunction(sum, Float64),
    latency_q          AggregateFunction(quantilesTDigest(0.5, 0.9, 0.99), Float32),
    ttft_q             AggregateFunction(quantilesTDigest(0.5, 0.9, 0.99), Float32),
    overhead_q         AggregateFunction(quantilesTDigest(0.5, 0.9, 0.99), Float32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (route, model, user, minute, groups, provider, split_arm, key_id, endpoint, is_shadow)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.requests_1m_mv TO {database}.requests_1m AS
SELECT
    toStartOfMinute(ts) AS minute,
    route, model, user, groups, provider, split_arm, key_id, endpoint, is_shadow,
    count() AS requests,
    countIf(status >= 400) AS errors,
    countIf(status >= 500) AS server_errors,
    countIf(status = 429) AS ratelimited,
    countIf(guardrail_action = 'block') AS blocked,
    countIf(streamed) AS streamed_requests,
    sum(prompt_tokens) AS prompt_tokens,
    sum(completion_tokens) AS completion_tokens,
    sum(cached_tokens) AS cached_tokens,
    sum(cost_micro_usd) AS cost_micro_usd,
    sum(toFloat64(latency_ms)) AS latency_sum_ms,
    quantilesTDigestState(0.5, 0.9, 0.99)(latency_ms) AS latency_q,
    quantilesTDigestStateIf(0.5, 0.9, 0.99)(ttft_ms, streamed AND ttft_ms > 0) AS ttft_q,
    quantilesTDigestState(0.5, 0.9, 0.99)(overhead_ms) AS overhead_q
FROM {database}.inference
GROUP BY minute, route, model, user, groups, provider, split_arm, key_id, endpoint, is_shadow;
