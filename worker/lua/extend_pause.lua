-- Pause for at least ARGV[1] ms from now: a pause only grows, so a later,
-- shorter Retry-After does not cut a longer one short. Returns the pause left.
local key, pause_ms = KEYS[1], tonumber(ARGV[1])
if redis.call('PTTL', key) < pause_ms then redis.call('SET', key, '1', 'PX', pause_ms) end
return redis.call('PTTL', key)
