-- Before `vidq retry --resubmit` puts a failed job back in line: its
-- generation id (and any "POST started" marker without an answer) go into
-- the job's history, so the next submit POSTs a new generation. Nothing
-- else is touched; the requeue that follows is the admission's.
-- Returns 'retired' or 'not_failed'.
local job_key = KEYS[1]

if redis.call('HGET', job_key, 'state') ~= STATE.failed then return 'not_failed' end
local generation_id = redis.call('HGET', job_key, 'generation_id') or ''
if generation_id ~= '' then
  local history = cjson.decode(redis.call('HGET', job_key, 'past_generations') or '[]')
  table.insert(history, generation_id)
  redis.call('HSET', job_key, 'past_generations', cjson.encode(history))
end
local posting = redis.call('HGET', job_key, 'posting_at') or ''
if posting ~= '' then
  redis.call('HSET', job_key, 'unknown_posts',
    (redis.call('HGET', job_key, 'unknown_posts') or '') .. posting .. ' ')
end
redis.call('HDEL', job_key, 'generation_id', 'posting_at', 'video_url', 'completed_at',
  'last_poll_age', 'polls')
redis.call('HINCRBY', job_key, 'resubmits', 1)
return 'retired'
