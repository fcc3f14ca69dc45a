-- May this job's POST go now? Returns 0 (send now; the send is counted) or
-- the ms to wait, on Redis's clock, shared by every worker.
-- The upstream limits submissions per second (2 for this model, as the
-- provider documents): a burst of C POSTs would meet 429s, and repeated 429s
-- under the cap read as a lower concurrency limit. Each job first books a
-- turn (turns are 1/rate apart, so waiting jobs wake one by one, not as a
-- herd); at its turn, the POSTs actually sent in the last window decide, so
-- a turn come late (a busy worker) cannot bunch sends up.
local job_key, turns_key, sent_key = KEYS[1], KEYS[2], KEYS[3]
local ref = ARGV[1]
local per_window, window_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
local GUARD_MS, EARLY_MS = 100, 20  -- a POST reaches the upstream a little after this call
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local booked = tonumber(redis.call('HGET', job_key, 'send_at') or '')
if booked and booked - now > EARLY_MS then return booked - now end
if not booked then
  local free = tonumber(redis.call('GET', turns_key) or '') or 0
  local at = math.max(now, free)
  local spacing = window_ms / per_window
  redis.call('SET', turns_key, at + spacing, 'PX', math.ceil(at + spacing - now) + 1000)
  if at - now > EARLY_MS then
    redis.call('HSET', job_key, 'send_at', at)
    return at - now
  end
end
redis.call('ZREMRANGEBYSCORE', sent_key, '-inf', now - window_ms - GUARD_MS)
if redis.call('ZCARD', sent_key) >= per_window then
  local oldest = tonumber(redis.call('ZRANGE', sent_key, 0, 0, 'WITHSCORES')[2])
  local wait = math.max(oldest + window_ms + GUARD_MS - now, 1)
  redis.call('HSET', job_key, 'send_at', now + wait)
  return wait
end
redis.call('ZADD', sent_key, now, ref .. '@' .. now)
redis.call('PEXPIRE', sent_key, window_ms + GUARD_MS + 1000)
redis.call('HDEL', job_key, 'send_at')
return 0
