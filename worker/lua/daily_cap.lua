-- Whether today's credit cap holds admission back: the next job in turn would
-- pass it, priced as lua/pump.lua prices it (estimate_of). The next job in
-- turn: the head of the first batch, in the highest ring that has one, that
-- the pump would serve (not paused, cancelled or held by a spend cap). 0
-- while no job waits or no cap is set. Read by `vidq status`, `vidq enqueue`
-- and Flower's backlog rows; nothing is written.
local config_key = KEYS[1]
local default_estimate = tonumber(ARGV[1])
local cap = tonumber(redis.call('HGET', config_key, 'daily_credits') or '')
if not cap then return 0 end

local function head_served(batch)
  local f = redis.call('HMGET', batch_key(batch), 'paused', 'cancelled', 'blocked')
  if f[1] == '1' or f[2] == '1' or (f[3] and f[3] ~= '') then return nil end
  return redis.call('ZRANGE', line_key(batch), 0, 0)[1]
end

for i = 2, #ARGV do
  for _, batch in ipairs(redis.call('LRANGE', NS.ring .. ARGV[i], 0, -1)) do
    local head = head_served(batch)
    if head then
      local t = redis.call('TIME')
      local d = redis.call('HMGET', NS.spend .. math.floor(tonumber(t[1]) / 86400),
        'committed', 'spent')
      local estimate = estimate_of(NS.job .. batch .. ':' .. head, config_key, default_estimate)
      return (tonumber(d[1]) or 0) + (tonumber(d[2]) or 0) + estimate > cap and 1 or 0
    end
  end
end
return 0
