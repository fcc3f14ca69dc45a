-- Free the slots of outcome-unknown jobs whose expected generation time has
-- passed (the upstream is done with them by now, or never started them),
-- unless a job that took its slot before them (or with them) still holds
-- it, or one that took it after still runs and none that took it with them
-- or after has been seen done upstream (transition.lua records the newest
-- such admission): the upstream is then slower than the fit that set the
-- hold (it just slowed down), and the unknown POST, if it created anything,
-- is likely still generating. (With only the first rule, the oldest
-- holder's hold ended on the old fit while the upstream ran 3x slower: C + 1
-- upstream; review 113. A hold with no job running after it waits for no
-- completion: with every slot held, none could come; review 115.) Such a
-- hold is looked at again in ARGV[2] seconds, never past ARGV[1] seconds
-- (VIDQ_DEADLINE_S) since its slot was taken. A purged job's generation whose
-- id is known is not guessed about: the reconciler asks the upstream, and
-- ends its hold once it ended (worker/purged_looks.py; review 116), or once
-- it is not known past the deadline; left here, past ARGV[3] seconds
-- (VIDQ_HARD_LIMIT_S), as a polled job's slot is. (Bounded by the deadline,
-- a generation slower than it lost its slot while it ran: C passed; review
-- 121.)
local holds_key, slots_key = KEYS[1], KEYS[2]
local longest_s, recheck_s = tonumber(ARGV[1]), tonumber(ARGV[2])
local looked_for_s = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

-- `taken` as Redis wrote it: a Lua number would be formatted back with 14
-- digits, and a job admitted by the same pump call (the same score) would
-- then count or not by the rounding. Such a job counts: it is no younger.
local function job_running(from, to)
  for _, other in ipairs(redis.call('ZRANGEBYSCORE', slots_key, from, to)) do
    if not redis.call('ZSCORE', holds_key, other) then return true end
  end
  return false
end

local function slower_than_fit(taken)
  if job_running('-inf', taken) then return true end
  local newest = redis.call('HGET', NS.config, 'done_slot_taken')
  return (not newest or tonumber(newest) < tonumber(taken))
    and job_running('(' .. taken, '+inf')
end

local released = 0
for _, ref in ipairs(redis.call('ZRANGEBYSCORE', holds_key, '-inf', now)) do
  local taken = redis.call('ZSCORE', slots_key, ref)
  local within = taken and now - tonumber(taken) < longest_s
  if taken and now - tonumber(taken) < looked_for_s
      and redis.call('HEXISTS', NS.purged_generations, ref) == 1 then
    -- left to its look
  elseif within and slower_than_fit(taken) then
    redis.call('ZADD', holds_key, now + recheck_s, ref)
  else
    redis.call('HDEL', NS.purged_generations, ref)
    redis.call('HDEL', NS.purged_not_found, ref)
    redis.call('ZREM', holds_key, ref)
    redis.call('ZREM', slots_key, ref)
    redis.call('HDEL', NS.purged, ref)  -- its POST was not refused in time: spent it stays
    released = released + 1
  end
end
return released
