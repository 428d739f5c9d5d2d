-- Move up to N of the oldest ready envelopes into one consumer's in-flight list and renew its
-- lease (if it is live).
-- KEYS[1] ready list (oldest at the right)
-- KEYS[2] the consumer's in-flight list (oldest at the right)
-- KEYS[3] leases sorted set
-- KEYS[4] in-flight registry (sorted set: consumer -> when it last took or beat, ms)
-- ARGV[1] how many to move at most (> 0)
-- ARGV[2] consumer name
-- KEYS[5] (a partition's consumer only) the partition's fence
-- ARGV[3] lease length, in ms
-- ARGV[4] (with KEYS[5]) this holder's fencing token
-- Returns the moved envelopes, oldest first (an empty array when ready is empty); -1, with
-- nothing written, when the token is not the partition's current one (another holds it).
if KEYS[5] and redis.call('GET', KEYS[5]) ~= ARGV[4] then
  return -1
end
-- Over maxmemory, Redis refuses a command that may grow memory only as a script's first
-- write: RPOP (which frees) goes first, so a full Redis can still be drained. The script
-- is atomic: the registry entry below exists before anything can land in the in-flight
-- list outside it (a blocking move), whether the leases survive or not.
local items = redis.call('RPOP', KEYS[1], ARGV[1])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
-- Only a live lease is renewed here. A lapsed or missing one is renewed by the heartbeat,
-- which tells the consumer so: a reap may have returned what it held to ready.
local lease = redis.call('ZSCORE', KEYS[3], ARGV[2])
if lease and tonumber(lease) >= now then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[2])
end
redis.call('ZADD', KEYS[4], now, ARGV[2])
if not items then
  return {}
end
for i = 1, #items, 4000 do
  redis.call('LPUSH', KEYS[2], unpack(items, i, math.min(i + 3999, #items)))
end
return items
