-- Append a producer's batch to the back of the ready list, at most once per batch.
-- KEYS[1] ready list
-- KEYS[2] this producer's sequence record
-- ARGV[1] batch sequence number (increases by one per batch of one producer)
-- ARGV[2] lifetime of the sequence record, in ms
-- ARGV[3..] envelopes, oldest first
-- Returns the number of envelopes appended, or -1 when this batch was applied before
-- (the reply to an earlier attempt was lost and the producer sent it again).
local last = redis.call('GET', KEYS[2])
if last and tonumber(last) >= tonumber(ARGV[1]) then
  -- A write all the same: a WAIT after this call then also covers the earlier, applied one.
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return -1
end
local n = #ARGV
-- unpack() is limited by the Lua C stack (about 8000 values), so push in chunks.
for i = 3, n, 4000 do
  redis.call('LPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 3999, n)))
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return n - 2
