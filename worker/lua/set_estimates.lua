-- Store the deployment's credit estimates (VIDQ_CREDIT_ESTIMATE, and per
-- model@RESOLUTION VIDQ_CREDIT_ESTIMATES), written by each starting worker.
-- The pump counts these against the spend caps, not what a producer's shell
-- wrote on the job (lua/pump.lua estimate_of). The table is replaced whole:
-- a shape the deployment dropped falls back to its default.
-- ARGV: default, then (shape, credits) pairs.
local config_key = KEYS[1]
local prefix = 'credit_estimate@'
for _, name in ipairs(redis.call('HKEYS', config_key)) do
  if string.sub(name, 1, #prefix) == prefix then redis.call('HDEL', config_key, name) end
end
redis.call('HSET', config_key, 'credit_estimate', ARGV[1])
for i = 2, #ARGV, 2 do redis.call('HSET', config_key, prefix .. ARGV[i], ARGV[i + 1]) end
return 1
