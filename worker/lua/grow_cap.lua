-- A generation ended without a 429 in its way: additive increase. After
-- PROBE_FACTOR x effective completions, the effective cap grows by one, up
-- to the configured C; the probe costs at most one 429 if the limit is real.
local config_key = KEYS[1]
local probe_factor = tonumber(ARGV[1])

local configured = tonumber(redis.call('HGET', config_key, 'max_in_flight') or '0') or 0
local effective = tonumber(redis.call('HGET', config_key, 'effective_cap') or '')
if not effective or effective >= configured then return configured end
local credit = redis.call('HINCRBY', config_key, 'cap_credit', 1)
if credit >= probe_factor * effective then
  effective = effective + 1
  redis.call('HSET', config_key, 'effective_cap', effective, 'cap_credit', 0)
end
return effective
