-- Recover entries of a group that sat idle past the lease (their consumer died or froze):
-- claim them for this consumer, with their delivery counts.
-- KEYS[1] stream
-- ARGV[1] group
-- ARGV[2] this consumer
-- ARGV[3] min idle time in ms (the lease)
-- ARGV[4] cursor: '0-0' starts a pass over the group's pending entries
-- ARGV[5] most entries to claim
-- ARGV[6] when > 0 and a pass starts: remove consumers idle longer than this many ms that
--   hold no pending entries
-- Returns {next cursor, trimmed, removed consumers, id, deliveries, fields, id, ...}: trimmed
-- counts pending entries found deleted from the stream; they leave the pending list.
local stream, group, me = KEYS[1], ARGV[1], ARGV[2]
local removed = 0
if ARGV[4] == '0-0' and tonumber(ARGV[6]) > 0 then
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', stream, group)) do
    local info = {}
    for i = 1, #c, 2 do
      info[c[i]] = c[i + 1]
    end
    if info['name'] ~= me and tonumber(info['pending']) == 0 and tonumber(info['idle']) > tonumber(ARGV[6]) then
      redis.call('XGROUP', 'DELCONSUMER', stream, group, info['name'])
      removed = removed + 1
    end
  end
end
local r = redis.call('XAUTOCLAIM', stream, group, me, ARGV[3], ARGV[4], 'COUNT', ARGV[5])
-- Redis 7 lists deleted entries apart and drops them from the pending list.
local trimmed = r[3] and #r[3] or 0
local out = {r[1], trimmed, removed}
for _, e in ipairs(r[2]) do
  if type(e) == 'table' and type(e[2]) == 'table' then
    local p = redis.call('XPENDING', stream, group, e[1], e[1], 1)
    out[#out + 1] = e[1]
    out[#out + 1] = p[1][4]
    out[#out + 1] = e[2]
  else
    out[2] = out[2] + 1
    if type(e) == 'table' then
      redis.call('XACK', stream, group, e[1]) -- Redis 6.2: a deleted entry, still pending
    end
  end
end
return out
