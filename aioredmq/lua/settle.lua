-- Settle messages a consumer holds: each leaves the in-flight list and, if it was still
-- there, goes where its action says. A message already gone (its lease was lost and it was
-- recovered elsewhere) is left alone, so a late or resent settle never creates a duplicate.
-- KEYS[1] the consumer's in-flight list (oldest at the right)
-- KEYS[2] ready list
-- KEYS[3] delayed sorted set
-- KEYS[4] dead-letter list
-- KEYS[5] scheduled hash (message id -> envelope) of the delayed set
-- KEYS[6] processed-id markers (sorted set: message id -> expiry in ms)
-- ARGV[1] k, the number of plain acks
-- ARGV[2 .. k+1] acks, each the tag '<id> <attempts>' naming one delivery exactly; acks
--   arrive mostly oldest first, so most match the oldest end of the list in order, and
--   one LTRIM removes them all
-- ARGV[k+2 ..], four per other settle: held envelope, action, new value, score
--   action 'F' to the front of ready (next in line); new value is the envelope to push
--   action 'B' to the back of ready
--   action 'D' to the delayed set, due <score> ms from now (by the server's clock)
--   action 'X' to dead-letter; new value is the dead-letter record
--   action 'M' an ack that also marks message id <value> processed for <score> ms; the
--     marker is written even when the ack is late, since the handler's work was done
-- KEYS[7] (a partition's consumer only) the partition's fence; ARGV[1] is then the holder's
--   fencing token and the arguments above follow it. With a token that is not the current
--   one, nothing is written and every settle is late: the partition has another holder.
-- Returns the 1-based positions (acks first, then the others) of messages no longer in flight.
if KEYS[7] then
  if redis.call('GET', KEYS[7]) ~= ARGV[1] then
    local n = tonumber(ARGV[2])
    local all = {}
    for i = 1, n + (#ARGV - 2 - n) / 4 do
      all[i] = i
    end
    return all
  end
  table.remove(ARGV, 1)
end
local inflight = KEYS[1]
local k = tonumber(ARGV[1])
local late = {}
local matched = 0
-- Redis does not roll a script back: a key of another type met half-way would leave a
-- message taken from in flight and put nowhere. Check every key this call may write first.
if #ARGV > k + 1 then
  local want = {'list', 'list', 'zset', 'list', 'hash', 'zset'}
  for i = 1, 6 do
    local kind = redis.call('TYPE', KEYS[i])['ok']
    if kind ~= 'none' and kind ~= want[i] then
      return redis.error_reply('WRONGTYPE key ' .. KEYS[i] .. ' holds a ' .. kind .. ', not a ' .. want[i])
    end
  end
end
if k > 0 then
  local oldest = redis.call('LRANGE', inflight, -k, -1)
  local n = #oldest
  while matched < k and matched < n do
    local prefix = 'amq1 ' .. ARGV[matched + 2] .. ' '
    if string.sub(oldest[n - matched], 1, #prefix) ~= prefix then
      break
    end
    matched = matched + 1
  end
  if matched > 0 then
    redis.call('LTRIM', inflight, 0, -matched - 1)
  end
end
if matched < k then
  -- Out of order: one look at the whole list (at most prefetch entries) finds the rest.
  local by_tag = {}
  for _, raw in ipairs(redis.call('LRANGE', inflight, 0, -1)) do
    local tag = string.match(raw, '^amq1 (%x+ %d+) ')
    if tag then
      by_tag[tag] = raw
    end
  end
  for i = matched + 2, k + 1 do
    local raw = by_tag[ARGV[i]]
    if not raw or redis.call('LREM', inflight, -1, raw) == 0 then
      late[#late + 1] = i - 1
    end
  end
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local marked = false
for i = k + 2, #ARGV, 4 do
  local action = ARGV[i + 1]
  -- LREM first: over maxmemory only a script's first write is checked, and this one frees.
  local removed = redis.call('LREM', inflight, -1, ARGV[i])
  if action == 'M' then
    redis.call('ZADD', KEYS[6], now + tonumber(ARGV[i + 3]), ARGV[i + 2])
    marked = true
  end
  if removed == 0 then
    late[#late + 1] = k + (i - k + 2) / 4
  else
    if action == 'F' then
      redis.call('RPUSH', KEYS[2], ARGV[i + 2])
    elseif action == 'B' then
      redis.call('LPUSH', KEYS[2], ARGV[i + 2])
    elseif action == 'D' then
      local id = string.match(ARGV[i + 2], '^amq1 (%x+) ')
      redis.call('ZADD', KEYS[3], now + tonumber(ARGV[i + 3]), id)
      redis.call('HSET', KEYS[5], id, ARGV[i + 2])
    elseif action == 'X' then
      redis.call('LPUSH', KEYS[4], ARGV[i + 2])
    end
  end
end
if marked then
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now)
end
return late
