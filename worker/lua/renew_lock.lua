-- Extend a lock's TTL only if it is still ours. Returns 1 if extended.
local lock_key, token, ttl_ms = KEYS[1], ARGV[1], ARGV[2]

if redis.call('GET', lock_key) == token then return redis.call('PEXPIRE', lock_key, ttl_ms) end
return 0
