-- One member of a partitioned queue's consumer set: give up partitions, renew what it
-- holds, and take free partitions up to its fair share (its quota). A partition is free when nobody
-- holds it or its holder's lease expired; at most one member holds it at a time.
-- KEYS[1] members sorted set (member -> membership deadline, ms)
-- KEYS[2] holders hash (partition -> member)
-- KEYS[3] holds sorted set (partition -> hold deadline, ms)
-- ARGV[1] this member's name
-- ARGV[2] lease length, in ms
-- ARGV[3] number of partitions
-- ARGV[4] '1': leave (give up everything and deregister); '0': stay
-- ARGV[5..] partitions to give up now (their consumers have closed)
-- Returns {fair share, live members, partitions held after this call...}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local me, lease, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local function give_up(p)
  if redis.call('HGET', KEYS[2], p) == me then
    redis.call('HDEL', KEYS[2], p)
    redis.call('ZREM', KEYS[3], p)
  end
end
for i = 5, #ARGV do
  give_up(ARGV[i])
end
if ARGV[4] == '1' then
  for p = 0, n - 1 do
    give_up(tostring(p))
  end
  redis.call('ZREM', KEYS[1], me)
  return {0, redis.call('ZCARD', KEYS[1])}
end
-- Forget expired members before renewing: over maxmemory only a script's first write is
-- checked, and this one cannot grow memory, so a full Redis does not cost the holds.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
redis.call('ZADD', KEYS[1], now + lease, me)
-- Quotas add up to exactly n: floor(n / live) each, one more for the first n % live
-- members by name, so no member idles while another holds more than its share.
local names = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(names)
local live, rank = #names, 1
for i, name in ipairs(names) do
  if name == me then
    rank = i
  end
end
local fair = math.floor(n / live)
if rank <= n % live then
  fair = fair + 1
end
local mine, free = {}, {}
for p = 0, n - 1 do
  local key = tostring(p)
  local holder = redis.call('HGET', KEYS[2], key)
  local deadline = tonumber(redis.call('ZSCORE', KEYS[3], key) or '-1')
  if holder == me and deadline >= now then
    mine[#mine + 1] = key
  elseif not holder or deadline < now then
    free[#free + 1] = key
  end
end
for _, key in ipairs(free) do
  if #mine >= fair then
    break
  end
  redis.call('HSET', KEYS[2], key, me)
  mine[#mine + 1] = key
end
local reply = {fair, live}
for _, key in ipairs(mine) do
  redis.call('ZADD', KEYS[3], now + lease, key)
  reply[#reply + 1] = tonumber(key)
end
return reply
