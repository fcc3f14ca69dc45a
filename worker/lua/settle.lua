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
-- so it keeps counting. Returns 1 if settled now, 0 if already.
local job_key = KEYS[1]
local outcome = ARGV[1]
local reported = tonumber(ARGV[2])  -- '' when the upstream did not say

local f = redis.call('HMGET', job_key, 'batch', 'credits_pending', 'generation_id',
  'posting_at', 'outcome_unknown')
if not f[1] or not f[2] then return 0 end
local pending = tonumber(f[2]) or 0
if outcome == 'adopted' then
  uncommit(job_key, f[1], pending)
  redis.call('HSET', job_key, 'credits_pending', '0')
  return 1
end
local spent, kept = 0, true
if outcome == 'done' then
  spent = reported or pending
elseif outcome == 'failed' then
  local has_id = f[3] and f[3] ~= ''
  local unknown = not has_id and ((f[4] and f[4] ~= '') or f[5] == '1')
  if has_id or unknown then spent = reported or pending end
  kept = unknown
end
if pending == 0 then spent = 0 end  -- an existing generation polled again: paid before
if settle(job_key, f[1], spent, kept) then
  -- What this unknown outcome booked, for lua/undo_unknown.lua if a late
  -- refusal proves nothing was created.
  if outcome == 'failed' and kept then redis.call('HSET', job_key, 'unknown_booked', spent) end
  return 1
end
return 0
