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

-- Whether a batch is still as a reader saw it (`stamp`, its
-- '<reopened>:<total>') and every job of it has ended: what a manifest
-- describes (lua/manifest_written.lua) and what a purge may remove
-- (lua/begin_purge.lua).
local function finished_as_stamped(batch_key, counts_key, stamp)
  local batch = redis.call('HMGET', batch_key, 'reopened', 'total')
  local total = tonumber(batch[2] or '0')
  if (batch[1] or '0') .. ':' .. total ~= stamp then return false end
  local finished = 0
  for _, state in ipairs({STATE.done, STATE.failed, STATE.cancelled}) do
    finished = finished + tonumber(redis.call('HGET', counts_key, state) or '0')
  end
  return finished >= total
end
