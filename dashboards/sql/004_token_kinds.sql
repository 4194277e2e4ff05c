-- Every kind of token apart (issue 16): prompt-cache writes and their 1-hour part, reasoning tokens, whether the
-- gateway counted the usage itself, and what cache reads saved against the input price. prompt_tokens still counts
-- every prompt token: cached_tokens (reads) and cache_write_tokens are parts of it, as in OpenAI's usage.
ALTER TABLE {database}.inference
    ADD COLUMN IF NOT EXISTS cache_write_tokens UInt32 AFTER cached_tokens,
    ADD COLUMN IF NOT EXISTS cache_write_1h_tokens UInt32 AFTER cache_write_tokens,
    ADD COLUMN IF NOT EXISTS reasoning_tokens UInt32 AFTER cache_write_1h_tokens,
    ADD COLUMN IF NOT EXISTS usage_estimated Bool AFTER reasoning_tokens,
    ADD COLUMN IF NOT EXISTS cache_savings_micro_usd UInt64 AFTER cost_micro_usd;

ALTER TABLE {database}.requests_1m
    ADD COLUMN IF NOT EXISTS cache_write_tokens SimpleAggregateFunction(sum, UInt64) AFTER cached_tokens,
    ADD COLUMN IF NOT EXISTS cache_write_1h_tokens SimpleAggregateFunction(sum, UInt64) AFTER cache_write_tokens,
    ADD COLUMN IF NOT EXISTS reasoning_tokens SimpleAggregateFunction(sum, UInt64) AFTER cache_write_1h_tokens,
    ADD COLUMN IF NOT EXISTS estimated_requests SimpleAggregateFunction(sum, UInt64) AFTER reasoning_tokens,
    ADD COLUMN IF NOT EXISTS cache_savings_micro_usd SimpleAggregateFunction(sum, UInt64) AFTER cost_micro_usd;

-- The roll-up's view reads the new columns from here on; MODIFY QUERY swaps it in one step, so no insert in
-- between goes unrolled.
ALTER TABLE {database}.requests_1m_mv MODIFY QUERY
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
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(cache_write_1h_tokens) AS cache_write_1h_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    countIf(usage_estimated) AS estimated_requests,
    sum(cost_micro_usd) AS cost_micro_usd,
    sum(cache_savings_micro_usd) AS cache_savings_micro_usd,
    sum(toFloat64(latency_ms)) AS latency_sum_ms,
    quantilesTDigestState(0.5, 0.9, 0.99)(latency_ms) AS latency_q,
    quantilesTDigestStateIf(0.5, 0.9, 0.99)(ttft_ms, streamed AND ttft_ms > 0) AS ttft_q,
    quantilesTDigestState(0.5, 0.9, 0.99)(overhead_ms) AS overhead_q
FROM {database}.inference
GROUP BY minute, route, model, user, groups, provider, split_arm, key_id, endpoint, is_shadow;
