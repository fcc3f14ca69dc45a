-- Write one new job and put it at the back of its batch's line; an existing
-- id is left alone. Its credit estimate is what the spend caps count until
-- the upstream reports the real figure. A batch cancelled meanwhile (`vidq
-- cancel` while a big file was being written) takes no new job: one put in
-- its line after the cancel drained it would wait there forever. Nor does a
-- batch being purged (lua/begin_purge.lua): the job would outlive its batch.
-- Returns 1 written, 0 there already, -1 refused.
-- KEYS[5], when given, is the batch's enqueue lock, which must still hold
-- ARGV[6]: a producer stopped past the lock's TTL while another enqueued
-- writes nothing more (worker/leases.py, Fence).
local job_key, jobs_key, counts_key, batch_hash_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job_id, batch, request, now, estimate = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local first_extra = 7  -- ARGV[7..]: extra fields (name, value), set where unset

if KEYS[5] and redis.call('GET', KEYS[5]) ~= ARGV[6] then
  return redis.error_reply('VIDQ_LOCK_LOST the enqueue lock lapsed')
end

local function set_extras()
  for i = first_extra, #ARGV, 2 do redis.call('HSETNX', job_key, ARGV[i], ARGV[i + 1]) end
end

if redis.call('EXISTS', job_key) == 1 then
  set_extras()
  -- Written by this very call (`now` is the call's), sent again after a lost
  -- reply: it counts as new, as it did before the reply was lost.
  return redis.call('HGET', job_key, 'enqueued_at') == now and 1 or 0
end
local f = redis.call('HMGET', batch_hash_key, 'cancelled', 'purging')
if f[1] == '1' or f[2] then return -1 end
set_extras()
redis.call('HSET', job_key, 'id', job_id, 'batch', batch, 'request', request,
  'state', STATE.queued, 'enqueued_at', now, 'credits_estimate', estimate)
redis.call('SADD', jobs_key, job_id)
redis.call('HINCRBY', counts_key, STATE.queued, 1)
redis.call('HINCRBY', batch_hash_key, 'total', 1)
put_in_line(batch, job_key, job_id, false)
return 1
