"""The limiter's Redis scripts: each request's counters are read and written in one atomic round trip.

A budget's spend total `S` has two companions: `S:rz`, the reservations' expiry times by lease id, and
`S:rh`, their amounts by lease id plus their sum under `_total`, so an admission reads the sum in O(1)
and sweeps only what expired. A lease id voided by `RELEASE` (its admission timed out on our side) is
remembered under the void key, so the admission script, should it run after the release, takes nothing.
"""

_FREE_RESERVATION = """\
local function free_reservation(spend_key, member)
  local amounts = spend_key .. ':rh'
  local amount = tonumber(redis.call('HGET', amounts, member))
  if not amount then return false end
  redis.call('HDEL', amounts, member)
  redis.call('HINCRBY', amounts, '_total', -amount)
  redis.call('ZREM', spend_key .. ':rz', member)
  return true
end
"""

CHECK_AND_TAKE = """\
-- KEYS: window base keys (nw), slot sets (ns), spend totals (nc), then the void key of `member`.
-- ARGV: nw, ns, nc, lease_ms, take (0|1); limit, window_ms per window; the limit per slot set; the cap per
--       spend total; then member, estimate, and the amount per window (what changes from call to call last,
--       so the rest of a call is encoded once per set of counters).
-- Returns: allowed, now_ms, then previous, current, elapsed_ms per window; then slots in use
--          per slot set; then spent, reserved per spend total. Times come from Redis so every host agrees.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nw, ns, nc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local lease, take = tonumber(ARGV[4]), ARGV[5] == '1'
local slot_at = 6 + 2 * nw
local cap_at = slot_at + ns
local member, estimate = ARGV[cap_at + nc], tonumber(ARGV[cap_at + nc + 1])
local amount_at = cap_at + nc + 2
local out = {1, now}
local ok = true
for i = 1, nw do
  local limit, win = tonumber(ARGV[4 + 2 * i]), tonumber(ARGV[5 + 2 * i])
  local amount = tonumber(ARGV[amount_at + i - 1])
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
  if used >= tonumber(ARGV[slot_at + j - 1]) then ok = false end
  out[#out + 1] = used
end
for k = 1, nc do
  local key = KEYS[nw + ns + k]
  local expired = redis.call('ZRANGEBYSCORE', key .. ':rz', '-inf', now, 'LIMIT', 0, 100)
  if #expired > 0 then
    local amounts = redis.call('HMGET', key .. ':rh', unpack(expired))
    local gone = 0
    for _, amount in ipairs(amounts) do gone = gone + (tonumber(amount) or 0) end
    redis.call('HDEL', key .. ':rh', unpack(expired))
    redis.call('ZREM', key .. ':rz', unpack(expired))
    redis.call('HINCRBY', key .. ':rh', '_total', -gone)
  end
  local spent = tonumber(redis.call('GET', key)) or 0
  local reserved = tonumber(redis.call('HGET', key .. ':rh', '_total')) or 0
  local cap = tonumber(ARGV[cap_at + k - 1])
  if spent >= cap or spent + reserved + estimate > cap then ok = false end
  out[#out + 1] = spent
  out[#out + 1] = reserved
end
if ok and take and member ~= '' and redis.call('EXISTS', KEYS[#KEYS]) == 1 then take = false end
if ok and take then
  for i = 1, nw do
    local win, amount = tonumber(ARGV[5 + 2 * i]), tonumber(ARGV[amount_at + i - 1])
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
  if estimate > 0 then
    for k = 1, nc do
      local key = KEYS[nw + ns + k]
      redis.call('ZADD', key .. ':rz', now + lease, member)
      redis.call('HSET', key .. ':rh', member, estimate)
      redis.call('HINCRBY', key .. ':rh', '_total', estimate)
      redis.call('PEXPIRE', key .. ':rz', lease)
      redis.call('PEXPIRE', key .. ':rh', lease)
    end
  end
end
if not ok then out[1] = 0 end
return out
"""

SETTLE = _FREE_RESERVATION + """\
-- KEYS: window base keys (nw), spend totals (nc), slot sets (the rest).
-- ARGV: nw, nc, window_ms per window; then verify (0|1), member, the amount for every window, the spend for
--       every spend total, and ttl_ms per spend total.
-- Frees `member`'s reservations and slots; with verify, charges only when it still held one (a retry
-- after a try whose answer was lost must not charge twice). Returns 1 when it charged.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nw, nc = tonumber(ARGV[1]), tonumber(ARGV[2])
local at = 3 + nw
local verify, member, amount, spend = ARGV[at] == '1', ARGV[at + 1], tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
local held = false
if member ~= '' then
  for k = 1, nc do
    if free_reservation(KEYS[nw + k], member) then held = true end
  end
  for j = nw + nc + 1, #KEYS do
    if redis.call('ZREM', KEYS[j], member) == 1 then held = true end
  end
end
if verify and not held then return 0 end
for i = 1, nw do
  local win = tonumber(ARGV[2 + i])
  local key = KEYS[i] .. ':' .. math.floor(now / win)
  redis.call('INCRBY', key, amount)
  redis.call('PEXPIRE', key, win * 2)
end
if spend > 0 then
  for k = 1, nc do
    redis.call('INCRBY', KEYS[nw + k], spend)
    redis.call('PEXPIRE', KEYS[nw + k], tonumber(ARGV[at + 3 + k]))
  end
end
return 1
"""

RELEASE = _FREE_RESERVATION + """\
-- KEYS: slot sets (ns), spend totals (the rest but the last), the void key of `member` (last).
-- ARGV: ns, member, lease_ms.
local ns, member, lease = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
redis.call('SET', KEYS[#KEYS], 1, 'PX', lease)
for j = 1, ns do
  redis.call('ZREM', KEYS[j], member)
end
for k = ns + 1, #KEYS - 1 do
  free_reservation(KEYS[k], member)
end
return 1
"""
