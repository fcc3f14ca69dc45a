-- A submit the upstream refused for the account (429), or one that found
-- submits paused: the job goes back to the FRONT of its batch's line (its
-- enqueue position, and its batch first in its ring), no attempt used, its
-- slot and its committed credits freed, and submits pause for every worker
-- (a pause only grows: a later, shorter Retry-After does not cut it short).
-- In a batch cancelled meanwhile it ends cancelled instead.
-- The effective cap: a 429 while the upstream ran fewer of our generations
-- (slot holders with an id, not yet seen complete, or with a POST on its way)
-- than the effective cap
-- says the account's real limit may be lower. A second such 429, within
-- REPEAT_S after the pause the first one set ended, lowers the cap: halved,
-- never below those running nor below 1 (multiplicative decrease), at most
-- once per SETTLE_S, so a burst of 429s on POSTs sent together counts once.
-- Returns the effective cap after this.
local job_key, slots_key, due_key, config_key, pause_key, counts_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local ref = ARGV[1]
local running_token = ARGV[2]
local pause_ms = tonumber(ARGV[3])   -- 0: do not start a pause (one is already on)
local rate_limited = ARGV[4] == '1'  -- a real 429, not a paused submit

local configured = tonumber(redis.call('HGET', config_key, 'max_in_flight') or '1') or 1
local effective = tonumber(redis.call('HGET', config_key, 'effective_cap') or '') or configured
-- The pause first: a 429 is about the account, whichever copy of the step
-- met it. One taken over meanwhile leaves its job alone, and its 429 does
-- not count towards lowering the cap (that copy's view of what ran is old).
if pause_ms > 0 then extend_pause(pause_key, pause_ms) end
if redis.call('HGET', job_key, 'token') ~= running_token then return effective end
if (redis.call('HGET', job_key, 'generation_id') or '') ~= '' then
  -- An earlier POST's id landed meanwhile: that generation is paid, whatever
  -- this attempt met; never put back in line. A 429 still counts below.
  poll_at_once(job_key, slots_key, due_key, ref)
else
  redis.call('HSET', job_key, 'token', '', 'step', '', 'holder', '')
  -- A turn to POST booked before the pause is long gone (worker/pacing.py).
  redis.call('HDEL', job_key, 'send_at')
  -- Only a 429 proves the POST created nothing; a job bounced by a pause or a
  -- cancel keeps its marker (a recovered submit may have POSTed: never again).
  if rate_limited then redis.call('HDEL', job_key, 'posting_at') end
  redis.call('ZREM', slots_key, ref)
  redis.call('ZREM', due_key, ref)
  local batch = redis.call('HGET', job_key, 'batch')
  settle(job_key, batch, 0, false)
  if redis.call('HGET', batch_key(batch), 'cancelled') == '1' then
    redis.call('HINCRBY', counts_key, redis.call('HGET', job_key, 'state'), -1)
    redis.call('HINCRBY', counts_key, STATE.cancelled, 1)
    redis.call('HSET', job_key, 'state', STATE.cancelled)
  else
    put_in_line(batch, job_key, redis.call('HGET', job_key, 'id'), true)
  end
end
if not rate_limited then return effective end
local REPEAT_S, SETTLE_S = 60, 5
local now = tonumber(redis.call('TIME')[1])
redis.call('HSET', config_key, 'last_429_at', now)
-- Running, as the upstream may count them: generations not yet seen done,
-- and POSTs on their way (marker set, no id yet: one answered 201 a moment
-- ago is running upstream before its id is recorded here), and the slots
-- held under a name of their own ('<ref>#...': an earlier POST of a
-- re-POSTed job, a purged job's generation), which may be generating.
local running = 0
for _, holder in ipairs(redis.call('ZRANGE', slots_key, 0, -1)) do
  local id, done, posting = unpack(redis.call('HMGET', NS.job .. holder, 'generation_id',
                                              'completed_at', 'posting_at'))
  local has_id = id and id ~= ''
  if (has_id and not (done and done ~= '')) or (not has_id and posting and posting ~= '')
      or (string.find(holder, '#', 1, true) and redis.call('EXISTS', NS.job .. holder) == 0) then
    running = running + 1
  end
end
if running >= effective then return effective end
local repeat_until = tonumber(redis.call('HGET', config_key, 'under_cap_429_until') or '') or 0
local lowered = tonumber(redis.call('HGET', config_key, 'lowered_at') or '') or 0
redis.call('HSET', config_key, 'under_cap_429_until', now + math.ceil(pause_ms / 1000) + REPEAT_S)
if now <= repeat_until and now - lowered >= SETTLE_S then
  local halved = math.max(1, running, math.floor(effective / 2))
  -- Only a real drop restarts the climb back: a 429 that lowers nothing (C
  -- at 1 already) must not throw away the credit earned towards C.
  if halved < effective then
    effective = halved
    redis.call('HSET', config_key, 'effective_cap', effective, 'cap_credit', 0, 'lowered_at', now)
  end
end
return effective
