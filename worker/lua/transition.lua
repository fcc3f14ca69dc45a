-- Apply one change to a job if its token is still the expected one; start
-- the next step (a new token, due after delay + grace) or end the chain.
-- Returns the next token, '0' if the chain ended, false if the job moved on.
-- The batch's failed set changes with the state in the same step, so `vidq
-- retry` can read the failures alone; a job that ends is counted in its
-- minute of the batch's finish rate (`vidq status`).
local job_key, counts_key, due_key, slots_key, seq_key, holds_key, unknown_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local failed_key, finished_key = KEYS[8], KEYS[9]
local ref = ARGV[1]
local expected_token = ARGV[2]        -- '*' = any
local new_state = ARGV[3]             -- '' = keep
local next_step = ARGV[4]             -- '' = the chain ends
local due_in_s = tonumber(ARGV[5])    -- next step must have started by now + this
local release_slot = ARGV[6] == '1'
local hold_slot_s = tonumber(ARGV[7]) -- > 0: keep the slot this long, then free it
local job_id = ARGV[8]
local outcome_unknown = ARGV[9] == '1'
local op = ARGV[10]                   -- this call's id (see below)
local known_id = ARGV[11]             -- the generation id the step's copy of the job had
local first_field = 12

if redis.call('HGET', job_key, 'last_op') == op then
  -- This very call ran already: its reply was lost and the client sent it
  -- again. Answer what it answered then, not "the job moved on".
  return redis.call('HGET', job_key, 'last_op_result')
end

if expected_token ~= '*' and redis.call('HGET', job_key, 'token') ~= expected_token then
  return false
end
local recorded = redis.call('HGET', job_key, 'generation_id') or ''
if new_state == STATE.failed and recorded ~= '' and recorded ~= known_id then
  -- An answer this step did not see arrived (a late POST thread recorded it,
  -- maybe an earlier attempt's): that generation is paid, whatever this step
  -- met. Leave the job to its lease; the reconciler sends its poll.
  return false
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local old = redis.call('HGET', job_key, 'state')
if new_state ~= '' and new_state ~= old then
  redis.call('HINCRBY', counts_key, old, -1)
  redis.call('HINCRBY', counts_key, new_state, 1)
  redis.call('HSET', job_key, 'state', new_state)
  if new_state == STATE.failed then redis.call('SADD', failed_key, job_id) end
  if old == STATE.failed then
    redis.call('SREM', failed_key, job_id)
    unfail_finish_count(job_key)
  end
  if new_state == STATE.done or new_state == STATE.failed then
    local minute = math.floor(now / 60)
    redis.call('HINCRBY', finished_key, string.sub(new_state, 1, 1) .. ':' .. minute, 1)
    if new_state == STATE.failed then redis.call('HSET', job_key, 'failed_minute', minute) end
    -- A video stored: the store works (worker/storage_pause.py).
    if new_state == STATE.done then redis.call('HSET', NS.config, 'video_stored_at', now) end
    if redis.call('HLEN', finished_key) > 240 then
      -- Keep the last hour: the rate looks back minutes, not the whole night.
      for _, name in ipairs(redis.call('HKEYS', finished_key)) do
        if tonumber(string.sub(name, 3)) < minute - 60 then
          redis.call('HDEL', finished_key, name)
        end
      end
    end
  end
end
if #ARGV >= first_field then redis.call('HSET', job_key, unpack(ARGV, first_field)) end
if outcome_unknown then
  redis.call('HSET', job_key, 'outcome_unknown', '1')
  redis.call('SADD', unknown_key, job_id)
  -- Its answer may still come: `vidq purge` waits a while after this.
  redis.call('HSET', NS.batch .. redis.call('HGET', job_key, 'batch'), 'unknown_post_at', now)
end
if hold_slot_s > 0 then
  redis.call('ZADD', holds_key, now + hold_slot_s, ref)
elseif release_slot then
  -- A generation done upstream: the newest admission done so far tells an
  -- outcome-unknown hold admitted before it that the upstream is past it
  -- (lua/release_holds.lua). Only one POSTed in this slot: `vidq retry` and a
  -- generation found again take a slot for an old one (review 115).
  local taken = new_state == STATE.downloading and redis.call('ZSCORE', slots_key, ref)
  if taken and tonumber(redis.call('HGET', job_key, 'posting_at') or '0') >= tonumber(taken) then
    local newest = redis.call('HGET', NS.config, 'done_slot_taken')
    if not newest or tonumber(taken) > tonumber(newest) then
      redis.call('HSET', NS.config, 'done_slot_taken', taken)
    end
  end
  redis.call('ZREM', slots_key, ref)
end
if next_step == '' then
  redis.call('HSET', job_key, 'token', '', 'step', '', 'holder', '', 'last_op', op,
    'last_op_result', '0')
  redis.call('ZREM', due_key, ref)
  return '0'
end
local token = tostring(redis.call('INCR', seq_key))
redis.call('HSET', job_key, 'token', token, 'step', next_step, 'holder', '', 'last_op', op,
  'last_op_result', token)
redis.call('ZADD', due_key, now + due_in_s, ref)
return token
