-- Admit waiting jobs into free slots while fewer than C are held. C is the
-- deployment's one value in the config hash (lowered to the effective cap
-- after 429s); none stored yet, none admitted. Nothing is admitted while
-- submits are paused after a 429.
-- Returns a flat list ref1, token1, ref2, token2, ...
local slots_key, admission_key, due_key, seq_key, config_key, pause_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local lease_s = tonumber(ARGV[1])
local job_prefix = ARGV[2]

local cap = tonumber(redis.call('HGET', config_key, 'max_in_flight') or '0') or 0
local effective = tonumber(redis.call('HGET', config_key, 'effective_cap') or '')
if effective and effective < cap then cap = effective end
local out = {}
if cap < 1 or redis.call('EXISTS', pause_key) == 1 then return out end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
while redis.call('ZCARD', slots_key) < cap do
  local ref = redis.call('LPOP', admission_key)
  if not ref then break end
  local job_key = job_prefix .. ref
  if redis.call('HGET', job_key, 'state') == STATE.queued
      and not redis.call('ZSCORE', slots_key, ref) then
    local token = tostring(redis.call('INCR', seq_key))
    redis.call('HSET', job_key, 'token', token, 'step', STEP.submit, 'holder', '',
      'admitted_at', string.format('%.6f', now))
    redis.call('ZADD', slots_key, now, ref)
    redis.call('ZADD', due_key, now + lease_s, ref)
    table.insert(out, ref)
    table.insert(out, token)
  end
end
return out
