-- After-step of a job's transition (worker/events.py runs both in one call):
-- announce the job on the stream when this very call moved it into done or
-- failed. A stale token, a repeated step or a change within a state adds
-- nothing, so each state change is announced exactly once.
local function event_before(KEYS, ARGV)
  return redis.call('HGET', KEYS[1], 'state')
end

local function event_after(KEYS, ARGV, before, result)
  if not result then return end
  local job = redis.call('HMGET', KEYS[1], 'state', 'batch', 'id', 'generation_id',
    'storage_url', 'sha256', 'bytes', 'credits_used', 'last_error', 'outcome_unknown')
  local state = job[1]
  if state == before or (state ~= STATE.done and state ~= STATE.failed) then return end
  local batch, id = job[2], job[3]
  local fields = {'v', EVENT_VERSION, 'type', '', 'at', event_now(), 'batch', batch,
    'job', batch .. ':' .. id, 'custom_id', id, 'generation_id', job[4] or ''}
  if state == STATE.done then
    fields[4] = EVENT.video_stored
    for i, name in ipairs({'storage_url', 'sha256', 'bytes', 'credits_used'}) do
      table.insert(fields, name)
      table.insert(fields, job[4 + i] or '')
    end
  else
    fields[4] = EVENT.job_failed
    table.insert(fields, 'reason')
    table.insert(fields, job[9] or '')
    table.insert(fields, 'outcome_unknown')
    table.insert(fields, job[10] == '1' and '1' or '0')
  end
  redis.call('XADD', EVENT_STREAM, '*', unpack(fields))
end
