-- Move due messages from the delayed set to ready (a list queue) or to the stream. Safe
-- from any number of consumers at once: an entry moves only if this call removed it from
-- the set, so never twice, and only once its due time has passed by the server's clock.
-- KEYS[1] delayed sorted set (member: message id, score: due time in ms)
-- KEYS[2] scheduled hash (message id -> envelope)
-- KEYS[3] target: the ready list, or the stream
-- ARGV[1] 'list' (push to the back of ready) or 'stream' (append an entry, field 'm')
-- ARGV[2] how many to move at most
-- Returns {moved, ms until the next entry is due (-1: none; 0: more are due now)}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local moved = 0
for _, id in ipairs(due) do
  if redis.call('ZREM', KEYS[1], id) == 1 then
    local env = redis.call('HGET', KEYS[2], id)
    redis.call('HDEL', KEYS[2], id)
    if not env and string.sub(id, 1, 5) == 'amq1 ' then
      env = id  -- written by an earlier version: the member is the envelope itself
    end
    if env then
      if ARGV[1] == 'stream' then
        redis.call('XADD', KEYS[3], '*', 'm', env)
      else
        redis.call('LPUSH', KEYS[3], env)
      end
      moved = moved + 1
    end
  end
end
local next_due = -1
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt > 0 then
  next_due = math.max(0, tonumber(nxt[2]) - now)
end
return {moved, next_due}
