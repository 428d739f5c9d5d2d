-- Append a producer's batch to a stream, at most once per batch, then trim it.
-- KEYS[1] stream
-- KEYS[2] this producer's sequence record
-- KEYS[3] counter of entries a hard cap dropped before every group acked them
-- ARGV[1] batch sequence number (0: no batch, only trim)
-- ARGV[2] lifetime of the sequence record, in ms
-- ARGV[3] maxlen: keep at most this many entries (0: no cap)
-- ARGV[4] max age in ms: drop entries older than this (0: no limit)
-- ARGV[5] '1': ack-aware retention: first trim what every group has acked, and count what
--   the caps above then drop; '0': the caps trim approximately, acked or not
-- ARGV[6..] envelopes, oldest first; each becomes one entry with the field 'm'
-- Returns {appended, dropped}: appended is -1 when this batch was applied before (the
-- reply to an earlier attempt was lost and the producer sent it again); dropped counts
-- entries the caps removed although some group had not acked them (ack-aware mode only).
local seq = tonumber(ARGV[1])
local n = 0
if seq > 0 then
  local last = redis.call('GET', KEYS[2])
  if last and tonumber(last) >= seq then
    -- A write all the same: a WAIT after this call then also covers the earlier, applied one.
    redis.call('PEXPIRE', KEYS[2], ARGV[2])
    return {-1, 0}
  end
  for i = 6, #ARGV do
    redis.call('XADD', KEYS[1], '*', 'm', ARGV[i])
  end
  n = #ARGV - 5
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {n, 0}
end
local maxlen = tonumber(ARGV[3])
local cutoff = nil
if tonumber(ARGV[4]) > 0 then
  local t = redis.call('TIME')
  cutoff = string.format('%d-0', t[1] * 1000 + math.floor(t[2] / 1000) - tonumber(ARGV[4]))
end
if ARGV[5] ~= '1' then
  if maxlen > 0 then
    redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', maxlen)
  end
  if cutoff then
    redis.call('XTRIM', KEYS[1], 'MINID', '~', cutoff)
  end
  return {n, 0}
end
-- Ack-aware: every group has acked everything below its oldest pending entry, and below
-- the entry after its last delivered one. The smallest of those bounds is safe to trim to.
local function parse(id)
  local ms, sq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(sq)
end
local safe_ms, safe_seq = nil, nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #g, 2 do
    info[g[i]] = g[i + 1]
  end
  local ms, sq
  if tonumber(info['pending']) > 0 then
    ms, sq = parse(redis.call('XPENDING', KEYS[1], info['name'])[2])
  else
    ms, sq = parse(info['last-delivered-id'])
    sq = sq + 1
  end
  if not safe_ms or ms < safe_ms or (ms == safe_ms and sq < safe_seq) then
    safe_ms, safe_seq = ms, sq
  end
end
-- With no group yet nobody has acked anything: only the caps apply.
if safe_ms then
  redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d-%d', safe_ms, safe_seq))
end
local dropped = 0
if maxlen > 0 then
  dropped = dropped + redis.call('XTRIM', KEYS[1], 'MAXLEN', maxlen)
end
if cutoff then
  dropped = dropped + redis.call('XTRIM', KEYS[1], 'MINID', cutoff)
end
if dropped > 0 then
  redis.call('INCRBY', KEYS[3], dropped)
end
return {n, dropped}
