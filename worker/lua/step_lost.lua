-- A pool child died running this job's step (the OOM killer, a crash): its
-- worker lives on and beats, and the message comes back with a token the
-- claim already swapped, so nothing would run the step until its lease (a
-- step grace) ran out, its slot idle. Due now, so the next reconciler pass
-- re-sends it. Only the very claim that child took: a step that moved on
-- is left alone.
local job_key, due_key = KEYS[1], KEYS[2]
local claimed, ref = ARGV[1], ARGV[2]
if redis.call('HGET', job_key, 'token') ~= claimed then return 0 end
local t = redis.call('TIME')
redis.call('ZADD', due_key, 'XX', tonumber(t[1]) + tonumber(t[2]) / 1000000, ref)
return 1
