-- A worker received this job's (countdown) message: it holds the step now.
local job_key = KEYS[1]
local token, holder = ARGV[1], ARGV[2]
if redis.call('HGET', job_key, 'token') == token then
  redis.call('HSET', job_key, 'holder', holder)
  return 1
end
return 0
