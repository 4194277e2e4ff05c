"""The limiter's Redis scripts: each request's counters are read and written in one atomic round trip.

Every key a script touches is one of its KEYS (none is built inside), so on Redis Cluster, where all of
them carry one hash tag, a call still runs on one node, atomically. A sliding window is one hash: `i` the
index of the current fixed window, `c` its count and `p` the previous one's, rolled on by the write.
A budget's spend total `S` has two companions: `S:rz`, the reservations' expiry times by lease id, and
`S:rh`, their amounts by lease id plus their sum under `_total`, so an admission reads the sum in O(1)
and sweeps only what expired. A lease id voided by `RELEASE` (its admission timed out on our side) is
remembered under the void key, so the admission script, should it run after the release, takes nothing.
"""

_FREE_RESERVATION = """\
local function free_reservation(expiries, amounts, member)
  local amount = tonumber(redis.call('HGET', amounts, member))
  if not amount then return false end
  redis.call('HDEL', amounts, member)
  redis.call('HINCRBY', amounts, '_total', -amount)
  redis.call('ZREM', expiries, member)
  return true
end
"""

_WINDOWS = """\
local function window_counts(key, index)
  local w = redis.call('HMGET', key, 'i', 'p', 'c')
  local at = tonumber(w[1])
  if at == index then return tonumber(w[2]) or 0, tonumber(w[3]) or 0 end
  if at == index - 1 then return tonumber(w[3]) or 0, 0 end
  return 0, 0
end
local function window_add(key, index, win, prev, curr, amount)
  if curr > 0 then
    redis.call('HINCRBY', key, 'c', amount)
  else
    redis.call('HSET', key, 'i', index, 'p', prev, 'c', amount)
  end
  redis.call('PEXPIRE', key, win * 2)
end
"""

CHECK_AND_TAKE = _WINDOWS + """\
-- KEYS: windows (nw), slot sets (ns), spend totals (nc, three keys each: S, S:rz, S:rh), then the void key
--       of `member`.
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
  local prev, curr = window_counts(KEYS[i], index)
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
local spend_at = nw + ns
for k = 1, nc do
  local key, expiries, amounts = KEYS[spend_at + 3 * k - 2], KEYS[spend_at + 3 * k - 1], KEYS[spend_at + 3 * k]
  local expired = redis.call('ZRANGEBYSCORE', expiries, '-inf', now, 'LIMIT', 0, 100)
  if #expired > 0 then
    local held = redis.call('HMGET', amounts, unpack(expired))
    local gone = 0
    for _, amount in ipairs(held) do gone = gone + (tonumber(amount) or 0) end
    redis.call('HDEL', amounts, unpack(expired))
    redis.call('ZREM', expiries, unpack(expired))
    redis.call('HINCRBY', amounts, '_total', -gone)
  end
  local spent = tonumber(redis.call('GET', key)) or 0
  local reserved = tonumber(redis.call('HGET', amounts, '_total')) or 0
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
      window_add(KEYS[i], math.floor(now / win), win, out[3 * i], out[3 * i + 1], amount)
      out[3 * i + 1] = out[3 * i + 1] + amount
    end
  end
  for j = 1, ns do
    redis.call('ZADD', KEYS[nw + j], now + lease, member)
    redis.call('PEXPIRE', KEYS[nw + j], lease)
  end
  if estimate > 0 then
    for k = 1, nc do
      local expiries, amounts = KEYS[spend_at + 3 * k - 1], KEYS[spend_at + 3 * k]
      redis.call('ZADD', expiries, now + lease, member)
      redis.call('HSET', amounts, member, estimate)
      redis.call('HINCRBY', amounts, '_total', estimate)
      redis.call('PEXPIRE', expiries, lease)
      redis.call('PEXPIRE', amounts, lease)
    end
  end
end
if not ok then out[1] = 0 end
return out
"""

SETTLE = _FREE_RESERVATION + _WINDOWS + """\
-- KEYS: windows (nw), spend totals (nc, three keys each: S, S:rz, S:rh), slot sets (the rest).
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
    if free_reservation(KEYS[nw + 3 * k - 1], KEYS[nw + 3 * k], member) then held = true end
  end
  for j = nw + 3 * nc + 1, #KEYS do
    if redis.call('ZREM', KEYS[j], member) == 1 then held = true end
  end
end
if verify and not held then return 0 end
for i = 1, nw do
  local win = tonumber(ARGV[2 + i])
  local index = math.floor(now / win)
  local prev, curr = window_counts(KEYS[i], index)
  window_add(KEYS[i], index, win, prev, curr, amount)
end
if spend > 0 then
  for k = 1, nc do
    redis.call('INCRBY', KEYS[nw + 3 * k - 2], spend)
    redis.call('PEXPIRE', KEYS[nw + 3 * k - 2], tonumber(ARGV[at + 3 + k]))
  end
end
return 1
"""

RELEASE = _FREE_RESERVATION + """\
-- KEYS: slot sets (ns), spend totals (three keys each: S, S:rz, S:rh), the void key of `member` (last).
-- ARGV: ns, member, lease_ms.
local ns, member, lease = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
redis.call('SET', KEYS[#KEYS], 1, 'PX', lease)
for j = 1, ns do
  redis.call('ZREM', KEYS[j], member)
end
for k = ns + 2, #KEYS - 1, 3 do
  free_reservation(KEYS[k], KEYS[k + 1], member)
end
return 1
"""
