-- A job leaves 'failed' (a retry, a late generation id): it no longer counts
-- as a failure in its batch's per-minute finish counts, which `vidq status`
-- reads for the rate and the failure-spike warning (lua/transition.lua noted
-- the minute it failed).
local function unfail_finish_count(job_key)
  local f = redis.call('HMGET', job_key, 'failed_minute', 'batch')
  if not f[1] then return end
  local finished_key, name = NS.batch .. f[2] .. ':finished', 'f:' .. f[1]
  if tonumber(redis.call('HGET', finished_key, name) or '0') > 0 then
    redis.call('HINCRBY', finished_key, name, -1)
  end
  redis.call('HDEL', job_key, 'failed_minute')
end
