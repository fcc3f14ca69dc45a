-- Admit waiting jobs into free slots while fewer than C are held. C is the
-- deployment's one value in the config hash (lowered to the effective cap
-- after 429s); none stored yet, none admitted. Nothing is admitted while
-- submits are paused after a 429.
-- Rings are served in the order given (high, normal, low): a lower ring only
-- when the higher ones are empty. In a ring, a batch gives one job and goes
-- to the back, so batches of one priority share the slots round-robin. A
-- paused, cancelled or emptied batch leaves its ring when it comes up; one
-- whose next job could pass its max-videos or max-credits leaves it marked
-- blocked = 'spend cap'. When the next job could pass the daily credit cap,
-- nothing more is admitted. Every turn admits a job or drops a batch from a
-- ring, so a call costs O(admitted + batches dropped), never O(jobs).
-- Refs left in the old single line (vidq:admission) are moved first, up to
-- MIGRATE_CHUNK per call.
-- Returns a flat list: moved, ref1, token1, ref2, token2, ...
-- The same call sent again (its reply was lost; `op` is its id) gets the
-- same list: the jobs it admitted must still be sent, not left to the
-- reconciler while they hold their slots.
local slots_key, due_key, seq_key, config_key, pause_key, old_line_key, replay_prefix =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local lease_s = tonumber(ARGV[1])
local default_estimate = tonumber(ARGV[2])
local spend_ttl_s = tonumber(ARGV[3])
local op = ARGV[4]
local first_priority = 5  -- ARGV[5..]: priorities, highest first
local MIGRATE_CHUNK = 1000
local REPLAY_TTL_S = 300  -- longer than redis-py's retries (Sentinel: ~60 s)

-- One key per call: another worker's pump in between must not overwrite it.
local replay_key = replay_prefix .. op
local replayed = redis.call('GET', replay_key)
if replayed then return cjson.decode(replayed) end

local function answer(out)
  if #out > 1 then redis.call('SET', replay_key, cjson.encode(out), 'EX', REPLAY_TTL_S) end
  return out
end

local moved = 0
while moved < MIGRATE_CHUNK do
  local ref = redis.call('LPOP', old_line_key)
  if not ref then break end
  local job_key = NS.job .. ref
  local f = redis.call('HMGET', job_key, 'state', 'batch', 'id')
  if f[1] == STATE.queued then put_in_line(f[2], job_key, f[3], false) end
  moved = moved + 1
end

local out = {moved}
local cap = tonumber(redis.call('HGET', config_key, 'max_in_flight') or '0') or 0
local effective = tonumber(redis.call('HGET', config_key, 'effective_cap') or '')
if effective and effective < cap then cap = effective end
if cap < 1 or redis.call('EXISTS', pause_key) == 1 then return answer(out) end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local day = math.floor(now / 86400)
local day_key = NS.spend .. day
local daily_cap = tonumber(redis.call('HGET', config_key, 'daily_credits') or '')

local function within_daily(estimate)
  if not daily_cap then return true end
  local d = redis.call('HMGET', day_key, 'committed', 'spent')
  return (tonumber(d[1]) or 0) + (tonumber(d[2]) or 0) + estimate <= daily_cap
end

local function leave_ring(batch, blocked)
  if redis.call('EXISTS', batch_key(batch)) == 0 then return end  -- purged meanwhile
  if blocked then
    redis.call('HSET', batch_key(batch), 'in_ring', '0', 'blocked', blocked)
  else
    redis.call('HSET', batch_key(batch), 'in_ring', '0')
  end
end

local function admit(batch, job_id, job_key, estimate)
  local ref = batch .. ':' .. job_id
  settle(job_key, batch, 0, false)  -- a commitment an earlier admission never settled
  redis.call('ZREM', line_key(batch), job_id)
  local token = tostring(redis.call('INCR', seq_key))
  redis.call('HSET', job_key, 'token', token, 'step', STEP.submit, 'holder', '',
    'admitted_at', string.format('%.6f', now), 'credits_pending', estimate, 'spend_day', day)
  redis.call('ZADD', slots_key, now, ref)
  redis.call('ZADD', due_key, now + lease_s, ref)
  redis.call('HINCRBYFLOAT', batch_key(batch), 'credits_committed', estimate)
  redis.call('HINCRBY', batch_key(batch), 'videos', 1)
  redis.call('HINCRBYFLOAT', day_key, 'committed', estimate)
  redis.call('EXPIRE', day_key, spend_ttl_s)
  table.insert(out, ref)
  table.insert(out, token)
end

-- One turn of `batch` from `ring`: 'admitted', 'dropped' or 'daily cap'.
local function serve(batch, ring, priority)
  -- Nor one being purged (lua/begin_purge.lua): a job admitted while a
  -- --force purge removed its batch was POSTed, paid, its record gone
  -- (review 137).
  local f = redis.call('HMGET', batch_key(batch), 'paused', 'cancelled', 'priority', 'purging')
  if f[1] == '1' or f[2] == '1' or f[4] then leave_ring(batch); return 'dropped' end
  if (f[3] or 'normal') ~= priority then
    leave_ring(batch)
    wake(batch, false)  -- its priority changed: into the right ring
    return 'dropped'
  end
  local job_id, job_key = first_queued(batch, slots_key, true)
  if not job_id then leave_ring(batch); return 'dropped' end
  local estimate = estimate_of(job_key, config_key, default_estimate)
  if over_batch_cap(batch, estimate) then leave_ring(batch, 'spend cap'); return 'dropped' end
  if not within_daily(estimate) then
    redis.call('LPUSH', ring, batch)  -- its turn is kept for when the cap allows
    return 'daily cap'
  end
  admit(batch, job_id, job_key, estimate)
  if redis.call('ZCARD', line_key(batch)) > 0 then
    redis.call('RPUSH', ring, batch)
  else
    leave_ring(batch)
  end
  return 'admitted'
end

for i = first_priority, #ARGV do
  local ring = NS.ring .. ARGV[i]
  while redis.call('ZCARD', slots_key) < cap do
    local batch = redis.call('LPOP', ring)
    if not batch then break end
    if serve(batch, ring, ARGV[i]) == 'daily cap' then return answer(out) end
  end
end
return answer(out)
