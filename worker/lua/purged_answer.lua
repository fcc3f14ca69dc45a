-- What a look at a purged generation (worker/purged_looks.py) was told:
-- ARGV[3] 'running', 'ended' or 'not known' (a 404 or 410). Ended, its hold
-- ends now, in the same step (left to lua/release_holds.lua, it was judged
-- as an unknown POST's hold and kept while a later job ran: a slot idle for
-- a generation; review 119). Not known, it ends only as a polled job's slot
-- is given up (StepOutcomes._not_found): ARGV[7] such answers in a row, the
-- first ARGV[6] seconds ago or more (VIDQ_BACKOFF_CAP_S), past ARGV[5]
-- seconds (VIDQ_DEADLINE_S) since its admission; a gateway's 404s while it
-- runs free nothing (review 119). Kept here, not in the looking process:
-- two workers taking turns at the looks made one's count run on over the
-- other's "running" (review 123). Otherwise the hold is looked at again in
-- ARGV[4] seconds. Only if the hold is still this generation's (ARGV[2]).
-- Returns 1 if the hold ended.
local holds_key, slots_key = KEYS[1], KEYS[2]
local name, id, answer = ARGV[1], ARGV[2], ARGV[3]
local again_s, deadline_s = tonumber(ARGV[4]), tonumber(ARGV[5])
local not_found_for_s, not_found_times = tonumber(ARGV[6]), tonumber(ARGV[7])
if redis.call('HGET', NS.purged_generations, name) ~= id then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

local ends = answer == 'ended'
if answer == 'not known' then
  local count, since = 0, now
  local seen = redis.call('HGET', NS.purged_not_found, name)
  if seen then
    local c, s = string.match(seen, '^(%S+) (%S+)$')
    count, since = tonumber(c), tonumber(s)
  end
  count = count + 1
  local taken = redis.call('ZSCORE', slots_key, name)
  ends = count >= not_found_times and now - since >= not_found_for_s
    and taken ~= false and now - tonumber(taken) >= deadline_s
  redis.call('HSET', NS.purged_not_found, name, count .. ' ' .. string.format('%.6f', since))
else
  redis.call('HDEL', NS.purged_not_found, name)
end
if ends then
  redis.call('HDEL', NS.purged_generations, name)
  redis.call('HDEL', NS.purged_not_found, name)
  redis.call('ZREM', holds_key, name)
  redis.call('ZREM', slots_key, name)
  return 1
end
redis.call('ZADD', holds_key, 'XX', now + again_s, name)
return 0
