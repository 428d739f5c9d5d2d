-- Renew one consumer's lease and list the consumers whose lease has expired.
-- KEYS[1] leases sorted set
-- ARGV[1] consumer name
-- ARGV[2] lease length, in ms
-- ARGV[3] how many expired consumers to return at most
-- Returns the names of consumers whose deadline has passed.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, tonumber(ARGV[3]))
