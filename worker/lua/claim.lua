-- Take a job's step: swap its token for 'run:<token>', lease the step and
-- return the record plus the Redis clock. A stale token gets nothing. The
-- same call sent again (its reply was lost; `op` is its id) gets the record.
local job_key, due_key, submit_pause_key, poll_pause_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local token = ARGV[1]
local lease_s = tonumber(ARGV[2])
local ref = ARGV[3]
local holder = ARGV[4]
local op = ARGV[5]

-- Tokens only grow (one INCR for all), so a job waiting with an older token
-- than this message's lost its last writes (a crash inside appendfsync
-- everysec's second, a failover to a lagging replica): no message carries
-- the token it has, and its step would wait a step grace, its slot idle,
-- for the reconciler. Due now instead, so the next pass re-sends it (review
-- 113). Not a claimed token ('run:'): once the counter itself went back,
-- an older number may be a step re-sent since and running now (review
-- 115); a waiting one re-sent again only supersedes its message. A pending
-- step is in the due set; a job that ended is not.
local function rolled_back(current)
  local older, mine = tonumber(current or ''), tonumber(token)
  return older and mine and older < mine and redis.call('ZSCORE', due_key, ref)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if redis.call('HGET', job_key, 'last_op') ~= op then
  local current = redis.call('HGET', job_key, 'token')
  if current ~= token then
    if not rolled_back(current) then return false end
    redis.call('ZADD', due_key, now, ref)
    return 'rolled back'
  end
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
