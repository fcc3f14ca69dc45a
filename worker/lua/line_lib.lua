-- Shared by the admission scripts (prepended after STATE, STEP and NS).
-- Each batch waits in its own line: a zset of job ids scored by enqueue
-- order, so a job put back keeps its place. A batch that has waiting jobs
-- and may be served sits once (in_ring = '1') in the ring of its priority,
-- a list the pump serves round-robin, one job per batch per turn.
local function batch_key(batch) return NS.batch .. batch end
local function line_key(batch) return NS.batch .. batch .. NS.line end

-- A paid generation whose chain restarts (a retry, or a submit bounced after
-- an earlier POST's id landed): it runs upstream whatever the line says, so
-- it holds a slot, and the reconciler sends its poll at once.
local function poll_at_once(job_key, slots_key, due_key, ref)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  redis.call('HSET', job_key, 'token', '', 'step', '', 'holder', '', 'recovered', '1')
  redis.call('ZADD', slots_key, 'NX', now, ref)
  redis.call('ZADD', due_key, now, ref)
end

-- Put `batch` in its priority's ring (at the front if `front`, moved there if
-- it is in the ring already), unless it is paused, cancelled, held by a spend
-- cap, being purged or has no one waiting.
local function wake(batch, front)
  local key = batch_key(batch)
  local f = redis.call('HMGET', key, 'in_ring', 'paused', 'cancelled', 'blocked', 'priority',
                       'purging')
  if f[2] == '1' or f[3] == '1' or (f[4] and f[4] ~= '') or f[6] then return false end
  local ring = NS.ring .. (f[5] or 'normal')
  if f[1] == '1' then
    if not front then return false end
    -- A job refused by a 429 goes first: its batch too, ahead of the others.
    redis.call('LREM', ring, 0, batch)
  elseif redis.call('ZCARD', line_key(batch)) == 0 then
    return false
  end
  redis.call(front and 'LPUSH' or 'RPUSH', ring, batch)
  redis.call('HSET', key, 'in_ring', '1')
  return true
end

-- Put a job (back) in its batch's line at its enqueue position; a job from
-- before per-batch lines gets the next position now.
local function put_in_line(batch, job_key, job_id, front)
  local seq = redis.call('HGET', job_key, 'seq')
  if not seq then
    seq = redis.call('HINCRBY', batch_key(batch), 'seq', 1)
    redis.call('HSET', job_key, 'seq', seq)
  end
  redis.call('ZADD', line_key(batch), seq, job_id)
  wake(batch, front)
end

-- The job's committed credits (its admission's estimate) are no longer
-- committed, for its batch and its day; a batch held by a spend cap is
-- woken, so the pump checks it again. Returns the day.
local function uncommit(job_key, batch, pending)
  local key = batch_key(batch)
  redis.call('HINCRBYFLOAT', key, 'credits_committed', -pending)
  local day = redis.call('HGET', job_key, 'spend_day')
  if day then redis.call('HINCRBYFLOAT', NS.spend .. day, 'committed', -pending) end
  if redis.call('HGET', key, 'blocked') == 'spend cap' then
    redis.call('HDEL', key, 'blocked')
    wake(batch, true)
  end
  return day
end

-- Turn the credits a job committed at admission into `spent` credits (0 for
-- a POST that created nothing), and give its video back to the batch's
-- max-videos unless `kept`. Once per admission: the pending field goes.
local function settle(job_key, batch, spent, kept)
  local pending = redis.call('HGET', job_key, 'credits_pending')
  if not pending then return false end
  local key = batch_key(batch)
  local day = uncommit(job_key, batch, tonumber(pending) or 0)
  if not kept then
    redis.call('HINCRBY', key, 'videos', -1)
    redis.call('HSET', job_key, 'video_given_back', '1')  -- lua/requeue.lua counts it again
  end
  if spent > 0 then
    redis.call('HINCRBYFLOAT', key, 'credits_spent', spent)
    redis.call('HINCRBYFLOAT', job_key, 'credits', spent)
    if day then redis.call('HINCRBYFLOAT', NS.spend .. day, 'spent', spent) end
  end
  redis.call('HDEL', job_key, 'credits_pending')
  return true
end

-- A failed job's commitment settled: the estimate (or `reported`) spent if a
-- generation may exist (an id, or a POST whose outcome is unknown: it may
-- have been charged), else 0. Its video goes back to the batch's max-videos
-- unless its POST's outcome is unknown: that generation may still answer
-- late and be downloaded (lua/record_generation.lua). What an unknown
-- outcome booked is kept for lua/undo_unknown.lua, an estimate booked in
-- place of a figure for lua/settle.lua. False if nothing was left to settle.
local function settle_failed(job_key, batch, reported)
  local f = redis.call('HMGET', job_key, 'credits_pending', 'generation_id', 'posting_at',
    'outcome_unknown', 'spend_day', 'posting_op')
  if not f[1] then return false end
  local pending = tonumber(f[1]) or 0
  local has_id = f[2] and f[2] ~= ''
  local unknown = not has_id and ((f[3] and f[3] ~= '') or f[4] == '1')
  local spent = 0
  -- (0 pending: an existing generation polled again, paid before)
  if (has_id or unknown) and pending > 0 then spent = reported or pending end
  if not settle(job_key, batch, spent, unknown) then return false end
  if unknown then redis.call('HSET', job_key, 'unknown_booked', spent) end
  if spent > 0 and not reported then
    -- Whose booking: the generation's id, else its POST's call id (a late
    -- id keeps it); a later POST's completion is not this one's (review 145).
    local owner = has_id and f[2] or (f[6] or '')
    redis.call('HSET', job_key, 'booked_estimate', (f[5] or '') .. ' ' .. spent .. ' ' .. owner)
  end
  return true
end

-- The batch's first job still queued and holding no slot (its id, its key).
-- Ids that are not (admitted by an old script, cancelled, paid late) are
-- dropped from the line on the way if `drop`, else passed over (a reader).
local function first_queued(batch, slots_key, drop)
  local line = line_key(batch)
  local at = 0
  while true do
    local head = redis.call('ZRANGE', line, at, at)
    if #head == 0 then return nil end
    local job_key = NS.job .. batch .. ':' .. head[1]
    if redis.call('HGET', job_key, 'state') == STATE.queued
        and not redis.call('ZSCORE', slots_key, batch .. ':' .. head[1]) then
      return head[1], job_key
    end
    if drop then redis.call('ZREM', line, head[1]) else at = at + 1 end
  end
end

-- Whether admitting a job of `estimate` credits would pass the batch's own
-- max-videos or max-credits.
local function over_batch_cap(batch, estimate)
  local f = redis.call('HMGET', batch_key(batch), 'max_videos', 'max_credits', 'videos',
    'credits_committed', 'credits_spent')
  local max_videos, max_credits = tonumber(f[1]), tonumber(f[2])
  if max_videos and (tonumber(f[3]) or 0) + 1 > max_videos then return true end
  return max_credits ~= nil
    and (tonumber(f[4]) or 0) + (tonumber(f[5]) or 0) + estimate > max_credits
end

-- The credits admitting the job commits: the deployment's estimate for its
-- shape (lua/set_estimates.lua), unless the job's own, from the producer's
-- shell, is higher: a producer may make the caps count more, never less.
-- Before any worker wrote one, the job's own, else `default_estimate`.
local function estimate_of(job_key, config_key, default_estimate)
  local f = redis.call('HMGET', job_key, 'credits_estimate', 'generation_id', 'shape')
  if f[2] and f[2] ~= '' then return 0 end  -- polled again, not paid again
  local own = tonumber(f[1])
  local deployed = tonumber(redis.call('HGET', config_key, 'credit_estimate@' .. (f[3] or ''))
    or redis.call('HGET', config_key, 'credit_estimate') or '')
  if not deployed then return own or default_estimate end
  return math.max(own or 0, deployed)
end
