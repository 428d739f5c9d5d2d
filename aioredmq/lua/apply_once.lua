-- Apply a handler's Redis effects and mark its message processed, in one step, unless it
-- was marked before: the effects then happen once per message id, whatever the deliveries.
-- KEYS[1] processed-id markers (sorted set: message id -> expiry in ms)
-- KEYS[2..] the key of each command, in order
-- ARGV[1] message id
-- ARGV[2] how long the marker lasts, in ms
-- ARGV[3..] per command: the number n of its arguments after the key, its name, then those n
-- Returns 1 if the effects were applied now, 0 if the message was marked already.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if expiry and tonumber(expiry) > now then
  return 0
end
-- Lua passes at most about 8,000 values to one call: check every command before the first
-- runs, so the script applies all of them or none.
local i = 3
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  if n > 7900 then
    return redis.error_reply('ERR a command of apply() has ' .. n .. ' arguments; at most 7900 fit in one call')
  end
  i = i + 2 + n
end
local k
i, k = 3, 2
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(ARGV[i + 1], KEYS[k], unpack(ARGV, i + 2, i + 1 + n))
  i = i + 2 + n
  k = k + 1
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return 1
