-- Forget a consumer that closed, but only once it holds nothing: if anything is still in its
-- in-flight list (a settle failed), the lease is left to expire so the reaper recovers it.
-- KEYS[1] leases sorted set
-- KEYS[2] the consumer's in-flight list
-- KEYS[3] in-flight registry
-- KEYS[4] (optional) lease lengths hash (consumer -> its lease length, ms)
-- ARGV[1] consumer name
-- Returns 1 when the consumer was removed, 0 when it still held messages.
if redis.call('LLEN', KEYS[2]) > 0 then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if KEYS[4] then
  redis.call('HDEL', KEYS[4], ARGV[1])
end
return 1
