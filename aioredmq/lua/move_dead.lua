-- Move chosen dead-letter records back into line (requeue) or drop them (purge).
-- KEYS[1] dead-letter list
-- KEYS[2] where a requeued message goes: a queue's ready list, or a stream
-- ARGV[1] 'list': push to the back of the ready list; 'stream': append an entry (field 'm')
-- ARGV[2..], two per record: the dead-letter record, the envelope to requeue ('' to only remove it)
-- Returns how many records were found and moved or removed (one another caller moved is skipped).
local n = 0
for i = 2, #ARGV, 2 do
  if redis.call('LREM', KEYS[1], -1, ARGV[i]) == 1 then
    if ARGV[i + 1] ~= '' then
      if ARGV[1] == 'stream' then
        redis.call('XADD', KEYS[2], '*', 'm', ARGV[i + 1])
      else
        redis.call('LPUSH', KEYS[2], ARGV[i + 1])
      end
    end
    n = n + 1
  end
end
return n
