-- Additive increase of the effective cap, up to the configured C: by one
-- after PROBE_FACTOR x effective completions without a 429, or after QUIET_S
-- seconds without one (so a passing 429 storm does not throttle the rest of
-- the night). A probe costs at most one 429 if the lower limit is real.
-- Not while submits are paused: nothing is learned then, and the quiet
-- time starts again when the pause ends.
local config_key, pause_key = KEYS[1], KEYS[2]
local probe_factor = tonumber(ARGV[1])
local quiet_s = tonumber(ARGV[2])
local completed = ARGV[3] == '1'   -- a generation just ended (else: a timer's check)

local configured = tonumber(redis.call('HGET', config_key, 'max_in_flight') or '0') or 0
local effective = tonumber(redis.call('HGET', config_key, 'effective_cap') or '')
if not effective or effective >= configured then return configured end
local t = redis.call('TIME')
local now = tonumber(t[1])
if redis.call('EXISTS', pause_key) == 1 then
  redis.call('HSET', config_key, 'last_429_at', now)
  return effective
end
local last_429 = tonumber(redis.call('HGET', config_key, 'last_429_at') or '0') or 0
local credit = tonumber(redis.call('HGET', config_key, 'cap_credit') or '0') or 0
if completed then credit = redis.call('HINCRBY', config_key, 'cap_credit', 1) end
if credit >= probe_factor * effective or now - last_429 >= quiet_s then
  effective = effective + 1
  redis.call('HSET', config_key, 'effective_cap', effective, 'cap_credit', 0, 'last_429_at', now)
end
return effective
