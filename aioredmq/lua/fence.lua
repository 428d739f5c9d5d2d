-- Make a member the holder of a partition: a new fencing token, greater than every earlier
-- one (it starts from the server's clock, so it grows even after the key was lost).
-- KEYS[1] the partition queue's fence (string '<epoch> <holder>')
-- ARGV[1] the new holder's name
-- Returns the new token; every take, heartbeat and settle of the holder must present it.
local t = redis.call('TIME')
local epoch = t[1] * 1000 + math.floor(t[2] / 1000)
local old = redis.call('GET', KEYS[1])
if old then
  local e = tonumber(string.match(old, '^(%d+) '))
  if e and e >= epoch then
    epoch = e + 1
  end
end
local token = string.format('%d', epoch) .. ' ' .. ARGV[1]
redis.call('SET', KEYS[1], token)
return token
