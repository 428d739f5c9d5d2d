-- Settle entries a consumer of a group holds. An entry no longer pending (acked by a
-- consumer that recovered it) is left alone, so a late or resent settle does nothing twice.
-- KEYS[1] stream
-- KEYS[2] the group's dead-letter list
-- KEYS[3] the group's processed-id markers (sorted set: message id -> expiry in ms)
-- ARGV[1] group
-- ARGV[2] this consumer
-- ARGV[3] k, the number of plain acks
-- ARGV[4 .. k+3] entry ids to ack
-- ARGV[k+4 ..], four per other settle: entry id, action, value, score
--   action 'X': ack it and push <value>, its dead-letter record
--   action 'M': ack it and mark message id <value> processed for <score> ms; the marker
--     is written even when the ack is late, since the handler's work was done
--   action 'R': if this consumer still holds it, set its idle time to <value> ms and, when
--     <score> >= 0, its delivery count to <score>. Idle 0 renews the lease; idle >= the
--     lease lets any consumer's recovery sweep take it (a release)
-- Returns the 1-based positions (acks first, then the others) of entries that were not
-- pending (acks, dead-letters) or no longer held by this consumer (releases).
local stream, group, me = KEYS[1], ARGV[1], ARGV[2]
local k = tonumber(ARGV[3])
local late = {}
for i = 4, k + 3 do
  if redis.call('XACK', stream, group, ARGV[i]) == 0 then
    late[#late + 1] = i - 3
  end
end
for i = k + 4, #ARGV, 4 do
  local id, action = ARGV[i], ARGV[i + 1]
  local ok = false
  if action == 'X' then
    ok = redis.call('XACK', stream, group, id) == 1
    if ok then
      redis.call('LPUSH', KEYS[2], ARGV[i + 2])
    end
  elseif action == 'M' then
    ok = redis.call('XACK', stream, group, id) == 1
    local t = redis.call('TIME')
    local now = t[1] * 1000 + math.floor(t[2] / 1000)
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[i + 3]), ARGV[i + 2])
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  elseif action == 'R' then
    ok = #redis.call('XPENDING', stream, group, id, id, 1, me) == 1
    if ok then
      local count = tonumber(ARGV[i + 3])
      if count >= 0 then
        redis.call('XCLAIM', stream, group, me, 0, id, 'IDLE', ARGV[i + 2], 'RETRYCOUNT', count, 'JUSTID')
      else
        redis.call('XCLAIM', stream, group, me, 0, id, 'IDLE', ARGV[i + 2], 'JUSTID')
      end
      -- XCLAIM drops a pending entry whose stream entry was deleted: then it is gone
      ok = #redis.call('XPENDING', stream, group, id, id, 1, me) == 1
    end
  end
  if not ok then
    late[#late + 1] = k + (i - k) / 4
  end
end
return late
