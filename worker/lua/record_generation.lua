-- Record a generation id the moment the POST answers. Never conditional on
-- the token: a paid generation is always kept, holds a slot and is due for a
-- poll, even if the job was failed meanwhile (an answer that came late).
-- A second, different id (an old POST answering after a resubmit) becomes a
-- sibling job '<id>~N' of its own, so its video is downloaded too.
local job_key, counts_key, due_key, slots_key, holds_key, unknown_key, jobs_key, batch_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local failed_key = KEYS[9]
-- From the paid-id journal (worker/paid_journal.py): the deployment id of the
-- Redis its marker went to. Another Redis's id (or this one flushed since)
-- is never recorded here.
local deployment = ARGV[6] or ''
if deployment ~= '' and redis.call('HGET', NS.config, 'deployment_id') ~= deployment then
  return 'foreign'
end
-- The account is not refused: 401/403 answers to POSTs no longer come in a row.
redis.call('DEL', KEYS[10])
local generation_id = ARGV[1]
local ref = ARGV[2]
local lease_s = tonumber(ARGV[3])
local job_prefix = ARGV[4]
local posting_op = ARGV[5] or ''  -- the answering POST's mark_posting call id

-- When the answering POST's job was enqueued ('' = not known: an older
-- journal entry): a job at this ref enqueued at another time is a new one.
local born = tonumber(ARGV[7] or '')

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local stamp = string.format('%.6f', now)
if redis.call('EXISTS', job_key) == 0
    or (born and tonumber(redis.call('HGET', job_key, 'enqueued_at') or '') ~= born) then
  -- Its batch was purged (with --force, or by retention) before the answer
  -- came: the paid id is kept where an operator can find it. So it is when
  -- the same name was enqueued again since: that job asks its own request
  -- and makes its own POST. The slot the purge kept for this POST
  -- ('<ref>#<posting_op>', lua/purge_jobs.lua) stays taken until its hold
  -- ends: the generation runs, and nobody polls it.
  redis.call('HSET', NS.orphans, generation_id, ref .. ' ' .. stamp)
  -- Created after all: what the purge booked as spent stays (lua/purge_jobs.lua).
  if posting_op ~= '' then redis.call('HDEL', NS.purged, ref .. '#' .. posting_op) end
  return 'orphan'
end

-- A POST answering after the job was re-POSTed held a slot of its own
-- (lua/requeue.lua); its generation now holds the job's or a sibling's.
local own_op = redis.call('HGET', job_key, 'posting_op') or ''
if posting_op ~= '' and own_op ~= '' and own_op ~= posting_op
    and (redis.call('HGET', job_key, 'generation_id') or '') == ''
    and (redis.call('HGET', job_key, 'posting_at') or '') ~= '' then
  -- ...while the re-POST is on the wire, holding the job's own slot: both may
  -- run. The earlier's slot goes on under the re-POST's name, held as long
  -- from its admission; its id, its refusal (lua/clear_posting.lua) or the
  -- hold's end frees it. Freed here, it went to a new job while two ran
  -- (review 133: 3 at C = 2).
  local earlier = ref .. '#' .. posting_op
  local taken = redis.call('ZSCORE', slots_key, earlier)
  if taken then
    local repost = ref .. '#' .. own_op
    local own_taken = redis.call('ZSCORE', slots_key, ref) or taken
    redis.call('ZADD', slots_key, own_taken, repost)
    local hold_until = redis.call('ZSCORE', holds_key, earlier)
    if hold_until then
      redis.call('ZADD', holds_key,
        tonumber(hold_until) + tonumber(own_taken) - tonumber(taken), repost)
    end
  end
end
if posting_op ~= '' then
  redis.call('ZREM', holds_key, ref .. '#' .. posting_op)
  redis.call('ZREM', slots_key, ref .. '#' .. posting_op)
  redis.call('HDEL', NS.purged, ref .. '#' .. posting_op)  -- created: spent it stays
end
local known = redis.call('HGET', job_key, 'generation_id')
if known == generation_id then return known end
if known and known ~= '' then
  -- The same id again (this call sent again after a lost reply, or the same
  -- answer recorded twice) has its sibling already.
  if redis.call('HGET', job_key, 'sibling:' .. generation_id) then return known end
  local n = redis.call('HINCRBY', job_key, 'extra_generations', 1) + 1
  local batch = redis.call('HGET', job_key, 'batch')
  local sibling_id = redis.call('HGET', job_key, 'id') .. '~' .. n
  local sibling_ref = batch .. ':' .. sibling_id
  redis.call('HSET', job_key, 'sibling:' .. generation_id, sibling_id)
  redis.call('HSET', job_prefix .. sibling_ref, 'id', sibling_id, 'batch', batch,
    'request', redis.call('HGET', job_key, 'request'), 'state', STATE.submitted,
    'generation_id', generation_id, 'submitted_at', stamp, 'admitted_at', stamp,
    'enqueued_at', stamp, 'token', '', 'step', '', 'recovered', '1')
  redis.call('SADD', jobs_key, sibling_id)
  redis.call('HINCRBY', counts_key, STATE.submitted, 1)
  redis.call('HINCRBY', batch_key, 'total', 1)
  redis.call('ZADD', slots_key, now, sibling_ref)
  redis.call('ZADD', due_key, now, sibling_ref)
  return known
end
local old = redis.call('HGET', job_key, 'state')
if old ~= STATE.submitted then
  redis.call('HINCRBY', counts_key, old, -1)
  redis.call('HINCRBY', counts_key, STATE.submitted, 1)
end
-- last_op cleared: a step's call sent again after this (a failure whose reply
-- was lost, the job revived meanwhile) answers 'moved on', not its old answer.
redis.call('HSET', job_key, 'generation_id', generation_id, 'submitted_at', stamp,
  'state', STATE.submitted, 'outcome_unknown', '', 'last_op', '')
-- Paid now: its resume checks' storage failures (the pauses they spent, when
-- they began) are no count of its download's (worker/storage_pause.py); a
-- retired generation it was to look at first is behind it (Steps.submit).
redis.call('HDEL', job_key, 'storage_pauses', 'storage_failing_since', 'check_before_post')
redis.call('ZREM', holds_key, ref)
redis.call('SREM', unknown_key, redis.call('HGET', job_key, 'id'))
redis.call('ZADD', slots_key, 'NX', now, ref)
if old == STATE.failed then
  -- Revived: nothing runs for it now; the reconciler sends a poll at once.
  -- The batch is open again: a manifest written already is out of date.
  redis.call('SREM', failed_key, redis.call('HGET', job_key, 'id'))
  unfail_finish_count(job_key)
  redis.call('HINCRBY', batch_key, 'reopened', 1)
  redis.call('HSET', job_key, 'token', '', 'recovered', '1')
  redis.call('ZADD', due_key, now, ref)
elseif not redis.call('HGET', job_key, 'token') then
  -- Never admitted, as far as this Redis knows: it lost the admission's writes
  -- (restarted from an older AOF, or everysec's last second) while the POST
  -- was out. No step owns the job, and none could take it from a missing
  -- token: the reconciler sends a poll at once, as for a revived job.
  redis.call('HSET', job_key, 'token', '', 'recovered', '1')
  redis.call('ZADD', due_key, now, ref)
else
  redis.call('ZADD', due_key, 'NX', now + lease_s, ref)
end
return generation_id
