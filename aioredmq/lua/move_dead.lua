-- Move chosen dead-letter records back to the back of ready (requeue) or drop them (purge).
-- KEYS[1] dead-letter list
-- KEYS[2] ready list
-- ARGV, two per record: the dead-letter record, the envelope to push ('' to only remove it)
-- Returns how many records were found and moved or removed.
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('LREM', KEYS[1], -1, ARGV[i]) == 1 then
    if ARGV[i + 1] ~= '' then
      redis.call('LPUSH', KEYS[2], ARGV[i + 1])
    end
    n = n + 1
  end
end
return n
