-- Recover what an expired consumer held: back to the front of ready with the attempt count
-- raised, or to dead-letter once it has been delivered max_deliveries times.
-- KEYS[1] leases sorted set
-- KEYS[2] the expired consumer's in-flight list (oldest at the right)
-- KEYS[3] ready list
-- KEYS[4] dead-letter list
-- KEYS[5] in-flight registry (sorted set: consumer -> when it last took or beat, ms)
-- KEYS[6] (optional) lease lengths hash (consumer -> its lease length, ms): forgotten with
--   the consumer
-- ARGV[1] consumer name
-- ARGV[2] max deliveries
-- ARGV[3] the lease length (ms): how long an expired, empty lease is kept before it is
--   forgotten, and how long a registered consumer without a lease entry counts as alive
-- ARGV[4] '1': reap even a live lease, and forget it (the caller took over a partition of a
--   partitioned queue, whose previous holder lost it); otherwise '0'
-- Returns {requeued, dead_lettered}; {-1, 0} when the lease is alive again (nothing touched).
-- A dead-letter record keeps the envelope with its attempt count raised to the deliveries
-- it had (each ended without an ack), as the consumers write theirs.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
local force = ARGV[4] == '1'
local keep = tonumber(ARGV[3])
local seen = redis.call('ZSCORE', KEYS[5], ARGV[1])
if not force then
  if deadline and tonumber(deadline) >= now then
    return {-1, 0}
  end
  -- No lease entry (lost or evicted): the registry says when it was last heard of.
  if not deadline and seen and tonumber(seen) + keep >= now then
    return {-1, 0}
  end
end
local max = tonumber(ARGV[2])
local items = redis.call('LRANGE', KEYS[2], 0, -1)
-- The in-flight list goes first: over maxmemory only a script's first write is checked
-- (the pushes below may grow memory), and this one frees.
redis.call('DEL', KEYS[2])
local requeued, dead = 0, 0
-- Newest first: each RPUSH goes to the front, so the oldest ends up first in line again.
for i = 1, #items do
  local raw = items[i]
  local _, e, id, n = string.find(raw, '^amq1 (%x+) (%d+) ')
  local reason = nil
  if e then
    local attempts = tonumber(n) + 1
    local counted = 'amq1 ' .. id .. ' ' .. attempts .. string.sub(raw, e)
    if attempts >= max then
      reason = 'lease of consumer ' .. ARGV[1] .. ' expired; delivered ' .. attempts .. ' times (max_deliveries=' .. max .. ')'
      raw = counted
    else
      redis.call('RPUSH', KEYS[3], counted)
      requeued = requeued + 1
    end
  else
    reason = 'not an aioredmq envelope (found in the in-flight list of ' .. ARGV[1] .. ')'
  end
  if reason then
    redis.call('LPUSH', KEYS[4], 'amqdead1 ' .. now .. ' ' .. #reason .. '\n' .. reason .. raw)
    dead = dead + 1
  end
end
-- Keep an expired entry for a while: a partitioned consumer's last blocking move may still
-- land in its in-flight list, and the next reap must find it.
if force or (deadline and tonumber(deadline) + keep < now and #items == 0) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  if KEYS[6] then
    redis.call('HDEL', KEYS[6], ARGV[1])
  end
end
-- The registry entry outlives a forced reap (a late move may still land) and is dropped only
-- once the list is empty and nothing was heard of its consumer for two leases.
if not force and #items == 0 and (not seen or tonumber(seen) + 2 * keep < now)
    and (not deadline or tonumber(deadline) + keep < now) then
  redis.call('ZREM', KEYS[5], ARGV[1])
  if KEYS[6] then
    redis.call('HDEL', KEYS[6], ARGV[1])
  end
end
return {requeued, dead}
