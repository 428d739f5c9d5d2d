-- List the entries a consumer of a group holds (its pending entries), with their delivery
-- counts and fields, oldest first.
-- KEYS[1] stream
-- ARGV[1] group
-- ARGV[2] consumer
-- ARGV[3] start: list entries after this id ('-': from the first)
-- ARGV[4] most entries to list
-- ARGV[5] '1': this listing is a new delivery (a restarted consumer resuming its entries):
--   raise each delivery count and restart each idle clock
-- Returns {id, deliveries, fields, ...}; an entry deleted from the stream while pending is
-- acked and listed with deliveries -1 and fields false.
local stream, group, me = KEYS[1], ARGV[1], ARGV[2]
local start = ARGV[3]
if start ~= '-' then
  start = '(' .. start
end
local out = {}
for _, p in ipairs(redis.call('XPENDING', stream, group, start, '+', ARGV[4], me)) do
  local id, n = p[1], p[4]
  local entry = redis.call('XRANGE', stream, id, id)
  out[#out + 1] = id
  if #entry == 0 then
    redis.call('XACK', stream, group, id)
    out[#out + 1] = -1
    out[#out + 1] = false
  else
    if ARGV[5] == '1' then
      n = n + 1
      redis.call('XCLAIM', stream, group, me, 0, id, 'RETRYCOUNT', n, 'JUSTID')
    end
    out[#out + 1] = n
    out[#out + 1] = entry[1][2]
  end
end
return out
