-- A POST that failed its job "outcome unknown" was refused after all (a late
-- 429, 503 or 4xx, matched to this attempt by lua/clear_posting.lua): nothing
-- was created. Undo what the unknown outcome booked: the slot hold, the
-- unknown mark, the credits counted as spent and the video counted against
-- the batch's max-videos. A non-empty ARGV[3] becomes the job's last_error.
-- Returns 'undone', 'not_yet' (the step's failure, or its settle, has not
-- landed yet) or 'moved_on' (an id arrived, or a newer attempt started).
local job_key, unknown_key, holds_key, slots_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ref, job_id, reason = ARGV[1], ARGV[2], ARGV[3]
local f = redis.call('HMGET', job_key, 'state', 'outcome_unknown', 'generation_id',
  'posting_at', 'batch', 'unknown_booked', 'spend_day', 'credits_pending')
if (f[3] or '') ~= '' or (f[4] or '') ~= '' then return 'moved_on' end
if f[1] ~= STATE.failed or f[8] then return 'not_yet' end
if f[2] ~= '1' then return 'moved_on' end
local batch = f[5]
local booked = tonumber(f[6]) or 0  -- this attempt's, not earlier ones' (lua/settle.lua)
if booked > 0 then
  redis.call('HINCRBYFLOAT', batch_key(batch), 'credits_spent', -booked)
  if f[7] then redis.call('HINCRBYFLOAT', NS.spend .. f[7], 'spent', -booked) end
  redis.call('HINCRBYFLOAT', job_key, 'credits', -booked)
end
redis.call('HDEL', job_key, 'unknown_booked', 'booked_estimate')  -- nothing was created
redis.call('HINCRBY', batch_key(batch), 'videos', -1)
redis.call('HSET', job_key, 'outcome_unknown', '')
if reason ~= '' then redis.call('HSET', job_key, 'last_error', reason) end
redis.call('SREM', unknown_key, job_id)
redis.call('ZREM', holds_key, ref)
redis.call('ZREM', slots_key, ref)
if redis.call('HGET', batch_key(batch), 'blocked') == 'spend cap' then
  redis.call('HDEL', batch_key(batch), 'blocked')
  wake(batch, true)
end
return 'undone'
