-- Put one failed job back in its batch's line at its enqueue position,
-- atomically: it is in the line exactly when its state says queued. A job
-- with a generation id is not put in line: it is polled again at once,
-- unless `retire` (`vidq retry --resubmit`): then its id goes into its
-- history and it waits in line for a new POST. Not a generation that
-- completed upstream (its video is paid for, and is polled and downloaded)
-- unless ARGV[6] (`--include-completed`: its video cannot be fetched); one
-- nobody saw complete is looked at again before the new POST, which is not
-- sent if it completed meanwhile. Checked and done in one call,
-- so a cancel between them cannot leave a failed job stripped of its id.
-- Returns 'requeued', 'resubmitted' (to be POSTed again), 'not_failed',
-- 'cancelled' (its batch was cancelled), 'purging' (its batch is being
-- removed: lua/begin_purge.lua) or 'needs_resubmit' (its POST's outcome is
-- unknown and resubmitting was not asked).
local job_key, counts_key, unknown_key, holds_key, slots_key, due_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local ref, job_id = ARGV[1], ARGV[2]
local resubmit_unknown = ARGV[3] == '1' or ARGV[5] == '1'
local retire = ARGV[5] == '1'
local op = ARGV[4]  -- this call's id: sent again after a lost reply, it answers again
-- (its own field: a claim of the requeued job may come before the re-send)

if redis.call('HGET', job_key, 'requeue_op') == op then
  return redis.call('HGET', job_key, 'requeue_answer') or 'requeued'
end
if redis.call('HGET', job_key, 'state') ~= STATE.failed then return 'not_failed' end
local batch = redis.call('HGET', job_key, 'batch')
if redis.call('HEXISTS', batch_key(batch), 'purging') == 1 then return 'purging' end
-- A failure whose settle never ran (its worker died between the two calls):
-- settled now as it would have been, before its marker and id are cleared.
-- Left, the pump settled it at 0 and gave its video back: a POST of unknown
-- outcome cost nothing, and --max-videos bought one more (review 143).
settle_failed(job_key, batch, nil)
local cancelled = redis.call('HGET', batch_key(batch), 'cancelled') == '1'
local generation_id = redis.call('HGET', job_key, 'generation_id') or ''
local completed = (redis.call('HGET', job_key, 'completed_at') or '') ~= ''
local keep_completed = ARGV[6] ~= '1'
if retire and not (generation_id ~= '' and completed and keep_completed) then
  if cancelled then return 'cancelled' end
  if generation_id ~= '' then
    local history = cjson.decode(redis.call('HGET', job_key, 'past_generations') or '[]')
    table.insert(history, generation_id)
    redis.call('HSET', job_key, 'past_generations', cjson.encode(history))
    local seen_failed = redis.call('HGET', job_key, 'failed_generation') == generation_id
    redis.call('HDEL', job_key, 'generation_id', 'video_url', 'completed_at',
      'last_poll_age', 'polls', 'kept_sha256', 'kept_bytes', 'kept_generation',
      'failed_generation')
    if not completed and not seen_failed then
      -- Nobody saw it finish (the hard limit, say): it may have since, paid
      -- for. The submit step looks at it before any POST (Steps.submit).
      -- Not one seen failed: an upstream that forgot it since would make
      -- the look poll it (a 404 short of the hard limit), never POSTing.
      redis.call('HSET', job_key, 'check_before_post', generation_id)
    end
    generation_id = ''
  end
  redis.call('HINCRBY', job_key, 'resubmits', 1)
end
local fields = {'outcome_unknown', '', 'attempts', '0', 'link_refreshes', '0', 'last_error', '',
  'token', '', 'step', '', 'recovered', '1', 'requeue_op', op,
  'last_op', ''}  -- a step's call sent again now answers 'moved on'
local answer = (retire and generation_id == '') and 'resubmitted' or 'requeued'
local function leave_failed(state)
  unfail_finish_count(job_key)
  -- The batch is open again: a manifest written for it is out of date. In
  -- this call: a `vidq retry` that died right after it left the manifest
  -- of the failures current for good (review 117).
  redis.call('HINCRBY', batch_key(batch), 'reopened', 1)
  redis.call('HSET', job_key, 'state', state, 'requeue_answer', answer, unpack(fields))
  -- Storage failures of an earlier night are no news of this one's (storage_pause);
  -- nor an earlier slot's 404s: kept, a slot given up then was never given
  -- up again, held to the hard limit (review 121).
  redis.call('HDEL', job_key, 'storage_pauses', 'storage_failing_since', 'not_found',
    'not_found_since', 'slot_given_up', 'video_given_back')
  redis.call('SREM', unknown_key, job_id)
  redis.call('SREM', batch_key(batch) .. ':failed', job_id)  -- keys.batch_failed
  redis.call('ZREM', holds_key, ref)
  redis.call('HINCRBY', counts_key, STATE.failed, -1)
  redis.call('HINCRBY', counts_key, state, 1)
end
if generation_id ~= '' then
  -- Paid: past pauses, spend caps and a cancel too (all about new POSTs).
  local given_back = redis.call('HGET', job_key, 'video_given_back') == '1'
  leave_failed(STATE.submitted)
  if given_back then
    -- Its video went back to the batch's max-videos when it failed; polled
    -- again it may come: counted again, and its end settles it with nothing
    -- more to spend (a stored video max-videos never counted: review 125).
    redis.call('HINCRBY', batch_key(batch), 'videos', 1)
    redis.call('HSET', job_key, 'credits_pending', '0')
  end
  poll_at_once(job_key, slots_key, due_key, ref)
  return 'requeued'
end
if cancelled then return 'cancelled' end
local posting = redis.call('HGET', job_key, 'posting_at') or ''
if posting ~= '' then
  if not resubmit_unknown then return 'needs_resubmit' end
  answer = 'resubmitted'
  redis.call('HSET', job_key, 'unknown_posts',
    (redis.call('HGET', job_key, 'unknown_posts') or '') .. posting .. ' ')
  redis.call('HDEL', job_key, 'posting_at')
  -- That POST may still be generating: its slot stays taken, under a name of
  -- its own, until its hold ends; the job waits in line for another slot.
  local hold_until = redis.call('ZSCORE', holds_key, ref)
  local t = redis.call('TIME')
  redis.call('HSET', batch_key(batch), 'unknown_post_at', tonumber(t[1]) + tonumber(t[2]) / 1000000)
  if hold_until then
    -- Named by that POST's call id: its late answer (an id, or a refusal) ends the hold.
    local earlier = ref .. '#' .. (redis.call('HGET', job_key, 'posting_op') or posting)
    redis.call('ZADD', holds_key, hold_until, earlier)
    redis.call('ZADD', slots_key, redis.call('ZSCORE', slots_key, ref) or hold_until, earlier)
  end
end
leave_failed(STATE.queued)
redis.call('ZREM', slots_key, ref)
put_in_line(batch, job_key, job_id, false)
return answer
