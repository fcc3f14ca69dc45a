-- Whether today's credit cap holds admission back: the job the pump
-- (lua/pump.lua) would admit next would pass it. That job is found and priced
-- as the pump finds and prices it: rings in the order given, in a ring the
-- first batch that is not paused, cancelled, held, in the wrong ring or past
-- its own caps, its first job still queued (first_queued, estimate_of). 0
-- while no job waits or no cap is set. Read by `vidq status`, `vidq enqueue`
-- and Flower's backlog rows; nothing is written.
local config_key, slots_key = KEYS[1], KEYS[2]
local default_estimate = tonumber(ARGV[1])
local cap = tonumber(redis.call('HGET', config_key, 'daily_credits') or '')
if not cap then return 0 end

-- The estimate of the job the pump would admit from `batch`, or nil if it
-- would pass the batch over.
local function next_estimate(batch, priority)
  local f = redis.call('HMGET', batch_key(batch), 'paused', 'cancelled', 'blocked', 'priority')
  if f[1] == '1' or f[2] == '1' or (f[3] and f[3] ~= '') then return nil end
  if (f[4] or 'normal') ~= priority then return nil end
  local _, job_key = first_queued(batch, slots_key, false)
  if not job_key then return nil end
  local estimate = estimate_of(job_key, config_key, default_estimate)
  if over_batch_cap(batch, estimate) then return nil end
  return estimate
end

for i = 2, #ARGV do
  for _, batch in ipairs(redis.call('LRANGE', NS.ring .. ARGV[i], 0, -1)) do
    local estimate = next_estimate(batch, ARGV[i])
    if estimate then
      local t = redis.call('TIME')
      local d = redis.call('HMGET', NS.spend .. math.floor(tonumber(t[1]) / 86400),
        'committed', 'spent')
      return (tonumber(d[1]) or 0) + (tonumber(d[2]) or 0) + estimate > cap and 1 or 0
    end
  end
end
return 0
