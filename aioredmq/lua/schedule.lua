-- Schedule a producer's batch of delayed messages, at most once per batch.
-- KEYS[1] delayed sorted set (member: message id, score: due time in ms)
-- KEYS[2] this producer's sequence record
-- KEYS[3] scheduled hash (message id -> envelope)
-- ARGV[1] batch sequence number (increases by one per batch of one producer)
-- ARGV[2] lifetime of the sequence record, in ms
-- ARGV[3] the due-time channel: told the ms until the earliest due time when this batch
--   brings it forward, so idle consumers set their timers at once
-- ARGV[4..] pairs: when, envelope; when is '+<ms>' (that long after now, by the server's
--   clock) or '=<ms>' (an absolute Unix time in ms)
-- Returns the number of messages scheduled, or -1 when this batch was applied before.
local last = redis.call('GET', KEYS[2])
if last and tonumber(last) >= tonumber(ARGV[1]) then
  -- A write all the same: a WAIT after this call then also covers the earlier, applied one.
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return -1
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local earliest = nil
for i = 4, #ARGV, 2 do
  local when, env = ARGV[i], ARGV[i + 1]
  local due = tonumber(string.sub(when, 2))
  if string.sub(when, 1, 1) == '+' then
    due = now + due
  end
  local id = string.match(env, '^amq1 (%x+) ')
  redis.call('ZADD', KEYS[1], due, id)
  redis.call('HSET', KEYS[3], id, env)
  if not earliest or due < earliest then
    earliest = due
  end
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if earliest and (#head == 0 or earliest < tonumber(head[2])) then
  redis.call('PUBLISH', ARGV[3], math.max(0, earliest - now))
end
return (#ARGV - 3) / 2
