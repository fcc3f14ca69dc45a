-- Delete a lock only if it is still ours: a writer whose lease ran out must
-- not free the lock a newer writer holds. Returns 1 if deleted.
local lock_key, token = KEYS[1], ARGV[1]

if redis.call('GET', lock_key) == token then return redis.call('DEL', lock_key) end
return 0
