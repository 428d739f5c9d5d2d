-- Move due entries of the delayed set to the back of ready, earliest first. Safe to run from
-- any number of consumers at once: an entry moves only if this call removed it.
-- KEYS[1] delayed sorted set (score: due time in ms)
-- KEYS[2] ready list
-- ARGV[1] how many to move at most
-- Returns {moved, ms until the next entry is due, or -1 when none is left}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local moved = 0
for i = 1, #due do
  if redis.call('ZREM', KEYS[1], due[i]) == 1 then
    redis.call('LPUSH', KEYS[2], due[i])
    moved = moved + 1
  end
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then
  return {moved, -1}
end
return {moved, math.max(0, tonumber(nxt[2]) - now)}
