"""The limiter's Redis scripts: each request's counters are read and written in one atomic round trip."""

CHECK_AND_TAKE = """\
-- KEYS: window base keys (nw), slot sets (ns), spend totals (nc).
-- ARGV: nw, ns, nc, member, lease_ms, take (0|1); then limit, window_ms, amount per window;
--       then the limit per slot set; then the cap per spend total.
-- Returns: allowed, now_ms, then previous, current, elapsed_ms per window; then slots in use
--          per slot set; then the spend per total. Times come from Redis so every host agrees.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nw, ns, nc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local member, lease, take = ARGV[4], tonumber(ARGV[5]), ARGV[6] == '1'
local out = {1, now}
local ok = true
local a = 7
for i = 1, nw do
  local limit, win, amount = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local index = math.floor(now / win)
  local prev = tonumber(redis.call('GET', KEYS[i] .. ':' .. (index - 1))) or 0
  local curr = tonumber(redis.call('GET', KEYS[i] .. ':' .. index)) or 0
  local elapsed = now - index * win
  local weighted = math.floor(prev * (win - elapsed) / win) + curr
  if weighted + amount > limit or weighted >= limit then ok = false end
  out[#out + 1] = prev
  out[#out + 1] = curr
  out[#out + 1] = elapsed
end
for j = 1, ns do
  local key = KEYS[nw + j]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local used = redis.call('ZCARD', key)
  if used >= tonumber(ARGV[a]) then ok = false end
  a = a + 1
  out[#out + 1] = used
end
for k = 1, nc do
  local spent = tonumber(redis.call('GET', KEYS[nw + ns + k])) or 0
  if spent >= tonumber(ARGV[a]) then ok = false end
  a = a + 1
  out[#out + 1] = spent
end
if ok and take then
  a = 7
  for i = 1, nw do
    local win, amount = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    a = a + 3
    if amount > 0 then
      local key = KEYS[i] .. ':' .. math.floor(now / win)
      redis.call('INCRBY', key, amount)
      redis.call('PEXPIRE', key, win * 2)
      out[3 * i + 1] = out[3 * i + 1] + amount
    end
  end
  for j = 1, ns do
    redis.call('ZADD', KEYS[nw + j], now + lease, member)
    redis.call('PEXPIRE', KEYS[nw + j], lease)
  end
end
if not ok then out[1] = 0 end
return out
"""

SETTLE = """\
-- KEYS: window base keys (nw), spend totals (nc), slot sets (the rest).
-- ARGV: nw, nc, member; then window_ms, amount per window; then amount, ttl_ms per spend total.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nw, nc, member = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local a = 4
for i = 1, nw do
  local win, amount = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  local key = KEYS[i] .. ':' .. math.floor(now / win)
  redis.call('INCRBY', key, amount)
  redis.call('PEXPIRE', key, win * 2)
end
for k = 1, nc do
  local amount, ttl = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  redis.call('INCRBY', KEYS[nw + k], amount)
  redis.call('PEXPIRE', KEYS[nw + k], ttl)
end
for j = nw + nc + 1, #KEYS do
  redis.call('ZREM', KEYS[j], member)
end
return 1
"""
