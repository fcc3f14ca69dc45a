-- A pool child died running this job's step (the OOM killer, a crash): its
-- worker lives on and beats, and the message comes back with a token the
-- claim already swapped, so nothing would run the step until its lease (a
-- step grace) ran out, its slot idle. Due now, so the next reconciler pass
-- re-sends it. Only the very claim that child took: a step that moved on
-- is left alone.
local job_key, due_key = KEYS[1], KEYS[2]
local claimed, ref = ARGV[1], ARGV[2]
if redis.call('HGET', job_key, 'token') ~= claimed then return 0 end
-- A POST this claim sent died with that child (its marker is the claim's
-- last act): no answer will come, so neither the submit re-sent
-- (posting.answer_may_come: its sender) nor `vidq purge` (the entry on the
-- wire) waits for one.
local batch, posting_op, last_op, generation_id = unpack(redis.call('HMGET', job_key,
  'batch', 'posting_op', 'last_op', 'generation_id'))
if posting_op and posting_op == last_op and not generation_id then
  redis.call('HSET', job_key, 'posting_by', '')
  redis.call('ZREM', NS.batch .. batch .. ':open_posts', ref .. '#' .. posting_op)
end
local t = redis.call('TIME')
redis.call('ZADD', due_key, 'XX', tonumber(t[1]) + tonumber(t[2]) / 1000000, ref)
return 1
