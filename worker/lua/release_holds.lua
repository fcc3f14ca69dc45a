-- Free the slots of outcome-unknown jobs whose expected generation time has
-- passed (the upstream is done with them by now, or never started them).
local holds_key, slots_key = KEYS[1], KEYS[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local refs = redis.call('ZRANGEBYSCORE', holds_key, '-inf', now)
for _, ref in ipairs(refs) do
  redis.call('ZREM', holds_key, ref)
  redis.call('ZREM', slots_key, ref)
end
return #refs
