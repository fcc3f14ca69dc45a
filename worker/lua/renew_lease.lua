-- A step still running past most of its lease (a slow download) extends it,
-- so the reconciler does not send a second copy. Returns 0 if the job's token
-- moved on: another copy owns the step now.
local job_key, due_key = KEYS[1], KEYS[2]
local token, ref, lease_s = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('HGET', job_key, 'token') ~= token then return 0 end
local t = redis.call('TIME')
redis.call('ZADD', due_key, 'XX', tonumber(t[1]) + tonumber(t[2]) / 1000000 + lease_s, ref)
return 1
