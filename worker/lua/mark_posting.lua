-- The "POST started" marker, written before the POST is sent. A job that
-- has one and no generation id is never POSTed again on its own. A job whose
-- batch was cancelled is not marked: `vidq cancel` may have landed after the
-- submit's own check, and a job not yet POSTed must never be sent.
-- Returns 'ok', 'stale' (the step moved on), 'has_id', 'posted_before' or
-- 'cancelled'. The same call sent again (its reply was lost; `op` is its id)
-- gets 'ok' again: the marker is its own, and its POST has not been sent;
-- unless the job moved on meanwhile (its worker stood still and another took
-- it over): 'stale', and nothing is sent.
local job_key, batch_key = KEYS[1], KEYS[2]
local running_token = ARGV[1]
local op = ARGV[2]
-- The id of an earlier try's marker whose answer was lost (Redis down): that
-- try gave up before its POST, so its marker is taken over, not 'posted_before'.
local unconfirmed = ARGV[3] or ''

if redis.call('HGET', job_key, 'token') ~= running_token then return 'stale' end
if redis.call('HGET', job_key, 'last_op') == op then return 'ok' end
local generation_id = redis.call('HGET', job_key, 'generation_id')
if generation_id and generation_id ~= '' then return 'has_id' end
local posting = redis.call('HGET', job_key, 'posting_at')
if posting and posting ~= ''
    and (unconfirmed == '' or redis.call('HGET', job_key, 'posting_op') ~= unconfirmed) then
  return 'posted_before'
end
-- A batch being purged (lua/begin_purge.lua) sends nothing more, as a cancelled one.
local batch_state = redis.call('HMGET', batch_key, 'cancelled', 'purging')
if batch_state[1] == '1' or batch_state[2] then return 'cancelled' end
local t = redis.call('TIME')
local stamp = string.format('%s.%06d', t[1], tonumber(t[2]))
-- posting_by: the worker sending it (the claim's holder), whose death ends
-- the wait for its answer (posting.answer_may_come).
redis.call('HSET', job_key, 'posting_at', stamp, 'posting_op', op, 'last_op', op,
  'posting_by', redis.call('HGET', job_key, 'holder') or '')
return 'ok'
