-- Take a job's step: swap its token for 'run:<token>', lease the step and
-- return the record plus the Redis clock. A stale token gets nothing. The
-- same call sent again (its reply was lost; `op` is its id) gets the record.
local job_key, due_key, submit_pause_key, poll_pause_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local token = ARGV[1]
local lease_s = tonumber(ARGV[2])
local ref = ARGV[3]
local holder = ARGV[4]
local op = ARGV[5]

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if redis.call('HGET', job_key, 'last_op') ~= op then
  if redis.call('HGET', job_key, 'token') ~= token then return false end
  redis.call('HSET', job_key, 'token', 'run:' .. token, 'holder', holder, 'last_op', op)
  redis.call('ZADD', due_key, now + lease_s, ref)
end
local record = redis.call('HGETALL', job_key)
table.insert(record, '__now')
table.insert(record, string.format('%.6f', now))
-- Shared 429 pauses, so the step can wait without calling the upstream.
table.insert(record, '__submit_pause_ms')
table.insert(record, tostring(math.max(0, redis.call('PTTL', submit_pause_key))))
table.insert(record, '__poll_pause_ms')
table.insert(record, tostring(math.max(0, redis.call('PTTL', poll_pause_key))))
return record
