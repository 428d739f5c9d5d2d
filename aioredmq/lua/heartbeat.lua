-- A consumer's timer tick: renew its lease, see when the next delayed message is due, and
-- list the consumers whose lease has expired.
-- KEYS[1] leases sorted set
-- KEYS[2] delayed sorted set (score: due time in ms)
-- KEYS[3] this consumer's in-flight list
-- ARGV[1] consumer name
-- ARGV[2] lease length, in ms
-- ARGV[3] how many expired consumers to return at most
-- Returns {ms until the next delayed message is due or -1, length of the in-flight list,
-- expired consumer names...}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
-- Over maxmemory, Redis refuses a command that may grow memory only as a script's first
-- write; a consumer must renew its lease all the same (it is what drains a full Redis),
-- so a write that cannot grow memory goes first.
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local next_due = -1
local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #nxt > 0 then
  next_due = math.max(0, tonumber(nxt[2]) - now)
end
local reply = {next_due, redis.call('LLEN', KEYS[3])}
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, tonumber(ARGV[3]))) do
  reply[#reply + 1] = name
end
return reply
