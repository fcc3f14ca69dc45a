-- The "POST started" marker, written before the POST is sent. A job that
-- has one and no generation id is never POSTed again on its own.
-- Returns 'ok', 'stale' (the step moved on), 'has_id' or 'posted_before'.
local job_key = KEYS[1]
local running_token = ARGV[1]

if redis.call('HGET', job_key, 'token') ~= running_token then return 'stale' end
local generation_id = redis.call('HGET', job_key, 'generation_id')
if generation_id and generation_id ~= '' then return 'has_id' end
local posting = redis.call('HGET', job_key, 'posting_at')
if posting and posting ~= '' then return 'posted_before' end
local t = redis.call('TIME')
redis.call('HSET', job_key, 'posting_at', t[1] .. '.' .. t[2])
return 'ok'
