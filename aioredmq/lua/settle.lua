-- Settle messages a consumer holds: each leaves the in-flight list and, if it was still
-- there, goes where the action says. A message already gone (its lease was lost and it was
-- recovered elsewhere) is left alone, so a late settle never creates a duplicate.
-- KEYS[1] the consumer's in-flight list
-- KEYS[2] ready list
-- KEYS[3] delayed sorted set
-- KEYS[4] dead-letter list
-- ARGV, four per message: held envelope, action, new value, score
--   action 'A' ack: nothing more
--   action 'F' to the front of ready (next in line); new value is the envelope to push
--   action 'B' to the back of ready
--   action 'D' to delayed, due <score> ms from now (by the server's clock)
--   action 'X' to dead-letter; new value is the dead-letter record
-- Returns the 1-based positions (in messages) of those that were no longer in flight.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local late = {}
for i = 1, #ARGV, 4 do
  if redis.call('LREM', KEYS[1], -1, ARGV[i]) == 0 then
    late[#late + 1] = (i + 3) / 4
  else
    local action = ARGV[i + 1]
    if action == 'F' then
      redis.call('RPUSH', KEYS[2], ARGV[i + 2])
    elseif action == 'B' then
      redis.call('LPUSH', KEYS[2], ARGV[i + 2])
    elseif action == 'D' then
      redis.call('ZADD', KEYS[3], now + tonumber(ARGV[i + 3]), ARGV[i + 2])
    elseif action == 'X' then
      redis.call('LPUSH', KEYS[4], ARGV[i + 2])
    end
  end
end
return late
