-- The batch's failed jobs, read from its failed set alone (O(failures)).
-- A member whose job is no longer failed (requeued by a script that does not
-- keep the set) is dropped from the set here, so the set heals itself.
-- Returns JSON: [[id, reason, generation_id, posting_at, outcome_unknown,
-- completed_at], ...].
local failed_key = KEYS[1]
local job_prefix = ARGV[1]  -- 'vidq:job:<batch>:'

local out = {}
for _, job_id in ipairs(redis.call('SMEMBERS', failed_key)) do
  local record = redis.call('HMGET', job_prefix .. job_id, 'state', 'last_error',
    'generation_id', 'posting_at', 'outcome_unknown', 'completed_at')
  if record[1] == STATE.failed then
    table.insert(out, {job_id, record[2] or '', record[3] or '', record[4] or '',
      record[5] or '', record[6] or ''})
  else
    redis.call('SREM', failed_key, job_id)
  end
end
if #out == 0 then return '[]' end
return cjson.encode(out)
