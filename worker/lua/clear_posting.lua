-- The upstream proved this attempt's POST created nothing (refused, 429, 503):
-- its "POST started" marker goes, so the job may be POSTed again. Only this
-- attempt's (ARGV[1], its mark_posting call id): an answer coming late, after
-- the job was requeued and POSTed again, must not erase the newer attempt's
-- marker. Returns 1 if the marker was this attempt's and is gone, else 0;
-- sent again after a lost reply, the same call answers 1 again ('cleared_op'),
-- or a late refusal's job would stay "outcome unknown", its slot held.
local job_key, holds_key, slots_key, op = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local ref = ARGV[2]
if op ~= '' then  -- an earlier attempt's own slot hold (lua/requeue.lua): nothing runs
  redis.call('ZREM', holds_key, ref .. '#' .. op)
  redis.call('ZREM', slots_key, ref .. '#' .. op)
  -- A purged job's (lua/purge_jobs.lua): what the purge booked as spent goes back.
  local booked = redis.call('HGET', NS.purged, ref .. '#' .. op)
  if booked then
    local day, amount = string.match(booked, '^(%S+) (%S+)$')
    redis.call('HINCRBYFLOAT', NS.spend .. day, 'spent', -tonumber(amount))
    redis.call('HDEL', NS.purged, ref .. '#' .. op)
  end
end
if op == '' or redis.call('HGET', job_key, 'posting_op') ~= op then return 0 end
if redis.call('HEXISTS', job_key, 'posting_at') == 0 then
  return redis.call('HGET', job_key, 'cleared_op') == op and 1 or 0
end
redis.call('HDEL', job_key, 'posting_at')
redis.call('HSET', job_key, 'cleared_op', op)
return 1
