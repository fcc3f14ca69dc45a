-- Write one new job and put it in line; an existing id is left alone.
local job_key, jobs_key, counts_key, admission_key, batch_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ref, job_id, batch, request, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

if redis.call('EXISTS', job_key) == 1 then return 0 end
redis.call('HSET', job_key, 'id', job_id, 'batch', batch, 'request', request,
  'state', STATE.queued, 'enqueued_at', now)
redis.call('SADD', jobs_key, job_id)
redis.call('HINCRBY', counts_key, STATE.queued, 1)
redis.call('RPUSH', admission_key, ref)
redis.call('HINCRBY', batch_key, 'total', 1)
return 1
