-- A submit the upstream refused for the account (429), or one that found
-- submits paused: the job goes back to the FRONT of its batch's line (its
-- enqueue position, and its batch first in its ring), no attempt used, its
-- slot and its committed credits freed, and submits pause for every worker.
-- In a batch cancelled meanwhile it ends cancelled instead. The upstream
-- refused while `held` other generations were in flight: if that is below
-- the effective cap, the account's real limit is lower, and the effective
-- cap drops to it (multiplicative decrease, never below 1).
-- Returns the effective cap after this.
local job_key, slots_key, due_key, config_key, pause_key, counts_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local ref = ARGV[1]
local running_token = ARGV[2]
local pause_ms = tonumber(ARGV[3])   -- 0: do not start a pause (one is already on)
local rate_limited = ARGV[4] == '1'  -- a real 429, not a paused submit

local configured = tonumber(redis.call('HGET', config_key, 'max_in_flight') or '1') or 1
local effective = tonumber(redis.call('HGET', config_key, 'effective_cap') or '') or configured
if redis.call('HGET', job_key, 'token') ~= running_token then return effective end
redis.call('HSET', job_key, 'token', '', 'step', '', 'holder', '')
redis.call('HDEL', job_key, 'posting_at')
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
if pause_ms > 0 then redis.call('SET', pause_key, '1', 'PX', pause_ms) end
if rate_limited then
  redis.call('HSET', config_key, 'last_429_at', redis.call('TIME')[1])
  local held = redis.call('ZCARD', slots_key)
  if held < effective then
    effective = math.max(1, held)
    redis.call('HSET', config_key, 'effective_cap', effective, 'cap_credit', 0)
  end
end
return effective
