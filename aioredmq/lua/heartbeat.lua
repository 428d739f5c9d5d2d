-- A consumer's timer tick: renew its lease, see when the next delayed message is due, and
-- list the consumers whose lease has expired.
-- KEYS[1] leases sorted set
-- KEYS[2] delayed sorted set (score: due time in ms)
-- KEYS[3] this consumer's in-flight list
-- KEYS[4] in-flight registry (sorted set: consumer -> when it last took or beat, ms)
-- KEYS[5] (optional) lease lengths (hash: consumer -> its lease length, ms), so that an
--   operator's view can tell a late heartbeat from a long lease
-- KEYS[6] (a partition's consumer only, after KEYS[5]) the partition's fence
-- ARGV[1] consumer name
-- ARGV[2] lease length, in ms
-- ARGV[3] how many expired consumers to return at most
-- ARGV[4] (with KEYS[6]) this holder's fencing token; when it is not the current one,
--   nothing is written (the lease is not renewed) and the reply is {-1, -1, 0}
-- Returns {ms until the next delayed message is due or -1, length of the in-flight list,
-- 1 if this consumer's lease had lapsed (or its entry was gone) before this renewal else 0,
-- expired consumer names...}. A lapsed lease may have been reaped: what the consumer holds
-- is then maybe someone else's. Expired: a lease that passed, or a registered consumer silent
-- for a lease whose lease entry is gone (evicted, lost, or forgotten by a forced reap).
if KEYS[6] and redis.call('GET', KEYS[6]) ~= ARGV[4] then
  return {-1, -1, 0}
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
-- Over maxmemory, Redis refuses a command that may grow memory only as a script's first
-- write; a consumer must renew its lease all the same (it is what drains a full Redis),
-- so a write that cannot grow memory goes first.
local lease = tonumber(ARGV[2])
local was = redis.call('ZSCORE', KEYS[1], ARGV[1])
local lapsed = (not was or tonumber(was) < now) and 1 or 0
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('ZADD', KEYS[4], now, ARGV[1])
if KEYS[5] then
  redis.call('HSET', KEYS[5], ARGV[1], lease)
end
local next_due = -1
local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #nxt > 0 then
  next_due = math.max(0, tonumber(nxt[2]) - now)
end
local reply = {next_due, redis.call('LLEN', KEYS[3]), lapsed}
local limit = tonumber(ARGV[3])
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, limit)) do
  reply[#reply + 1] = name
end
local room = limit - (#reply - 3)
if room > 0 then
  for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. (now - lease), 'LIMIT', 0, room)) do
    if not redis.call('ZSCORE', KEYS[1], name) then
      reply[#reply + 1] = name
    end
  end
end
return reply
