-- A job's generation ended: its committed credits become spent ones.
-- 'done' (the upstream completed it): the reported credits, else the
-- estimate. 'stored' (its video was already in storage, nothing POSTed): 0.
-- 'adopted' (a `retry --resubmit` took back an earlier generation, paid when
-- its job failed, nothing POSTed): nothing ends yet; the commitment goes
-- and its end settles with nothing to spend, its video counting or given
-- back to the batch's max-videos by how it ends (settled as 'stored', a
-- video that never came kept counting: review 123).
-- 'failed': the estimate if a generation may exist (an id, or a POST whose
-- outcome is unknown; it may have been charged), else 0; its video goes
-- back to the batch's max-videos, unless its POST's outcome is unknown: that
-- generation may still answer late and be downloaded (lua/record_generation.lua),
-- so it keeps counting (lua/line_lib.lua, settle_failed).
-- Returns 1 if settled now, 0 if already.
local job_key = KEYS[1]
local outcome = ARGV[1]
local reported = tonumber(ARGV[2])  -- '' when the upstream did not say

local f = redis.call('HMGET', job_key, 'batch', 'credits_pending', 'booked_estimate',
  'generation_id', 'posting_op')
local pending = f[2] and (tonumber(f[2]) or 0)

-- A generation whose failure booked the estimate (its POST's answer late,
-- or a timeout), then completed after all (the late id, `vidq retry`
-- polling it again): the upstream's figure replaces the estimate. The
-- completion has no commitment of its own to settle (none, or 0), and the
-- reported figure was dropped: --max-credits and the daily cap were passed
-- by any amount while spend said the estimate (review 143).
-- Only that generation's: one of a later POST (a --resubmit, a POST sent
-- again after a late refusal) is settled by its own commitment, and settles
-- again with none on every poll (review 145: spend went negative).
local day, booked, owner = string.match(f[3] or '', '^(%S*) (%S+) (%S*)$')
if outcome == 'done' and reported and owner and owner ~= '' and (pending or 0) == 0
    and (owner == f[4] or owner == f[5]) then
  local delta = reported - (tonumber(booked) or 0)
  redis.call('HINCRBYFLOAT', batch_key(f[1]), 'credits_spent', delta)
  redis.call('HINCRBYFLOAT', job_key, 'credits', delta)
  if day and day ~= '' and redis.call('EXISTS', NS.spend .. day) == 1 then
    redis.call('HINCRBYFLOAT', NS.spend .. day, 'spent', delta)
  end
  redis.call('HDEL', job_key, 'booked_estimate')
  if not pending then return 1 end
end
if not f[1] or not pending then return 0 end
if outcome == 'adopted' then
  uncommit(job_key, f[1], pending)
  redis.call('HSET', job_key, 'credits_pending', '0')
  return 1
end
if outcome == 'failed' then return settle_failed(job_key, f[1], reported) and 1 or 0 end
local spent = 0  -- 'stored'; and 0 pending: an existing generation polled again, paid before
if outcome == 'done' and pending > 0 then spent = reported or pending end
return settle(job_key, f[1], spent, true) and 1 or 0
