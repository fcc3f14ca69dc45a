-- The upstream knows a generation again after "not found" answers
-- (worker/step_outcomes.py `_not_found`): the count starts over, and a slot
-- given up is taken back while the generation runs. Only by the step holding
-- the job (its token, 'run:<token>'): a poll taken over meanwhile, or a job
-- that ended or was purged, must never take a slot nobody would free.
local job_key, slots_key = KEYS[1], KEYS[2]
local ref, token, running = ARGV[1], ARGV[2], ARGV[3] == '1'
if redis.call('HGET', job_key, 'token') ~= token then return 0 end
if running and redis.call('HGET', job_key, 'slot_given_up') == '1' then
  local t = redis.call('TIME')
  redis.call('ZADD', slots_key, 'NX', tonumber(t[1]) + tonumber(t[2]) / 1000000, ref)
end
redis.call('HDEL', job_key, 'not_found', 'not_found_since', 'slot_given_up')
return 1
