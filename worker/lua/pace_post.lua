-- May this job's POST go now? Returns 0 (send now; the send is counted) or
-- the ms to wait, on Redis's clock, shared by every worker.
-- The upstream limits submissions per second (2 for this model, as the
-- provider documents): a burst of C POSTs would meet 429s, and repeated 429s
-- under the cap read as a lower concurrency limit. The POSTs actually sent
-- in the last window decide: under the limit, a POST goes at once (bursts up
-- to the limit cost nothing). At the limit, the job books a turn (turns are
-- as far apart as the window lets POSTs go, so waiting jobs wake one by
-- one, not as a herd); at its turn the window decides again, so a turn come
-- late (a busy worker) cannot bunch sends up.
local job_key, turns_key, sent_key = KEYS[1], KEYS[2], KEYS[3]
local ref = ARGV[1]
local per_window, window_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
-- No wait is longer than every slot's POST in turn: a later booking, turn or
-- send time was made on a clock since stepped back (a failover, an NTP fix).
local longest_ms = tonumber(ARGV[4])
-- A POST reaches the upstream after this call: the marker, its durability
-- wait, a new TLS connection. The upstream counts arrivals: this much slack
-- (worker/pacing.py).
local GUARD_MS, EARLY_MS = tonumber(ARGV[5]), 20
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local booked = tonumber(redis.call('HGET', job_key, 'send_at') or '')
if booked and booked - now > longest_ms then booked = nil end
if booked and booked - now > EARLY_MS then return booked - now end
redis.call('ZREMRANGEBYSCORE', sent_key, '-inf', now - window_ms - GUARD_MS)
redis.call('ZREMRANGEBYSCORE', sent_key, '(' .. now, '+inf')
if redis.call('ZCARD', sent_key) < per_window then
  redis.call('ZADD', sent_key, now, ref .. '@' .. now)
  redis.call('PEXPIRE', sent_key, math.ceil(window_ms + GUARD_MS) + 1000)
  if booked then redis.call('HDEL', job_key, 'send_at') end
  return 0
end
-- A turn after those already booked (a job whose turn found the window
-- full too, rarely: a turn come late, takes a new one rather than all such
-- jobs waking together). Turns are as far apart as the window lets POSTs go.
local oldest = tonumber(redis.call('ZRANGE', sent_key, 0, 0, 'WITHSCORES')[2])
local spacing = (window_ms + GUARD_MS) / per_window
local turns = tonumber(redis.call('GET', turns_key) or '') or 0
if turns - now > longest_ms then turns = 0 end
local at = math.max(oldest + window_ms + GUARD_MS, turns, now + 1)
redis.call('SET', turns_key, at + spacing, 'PX', math.ceil(at + spacing - now) + 1000)
redis.call('HSET', job_key, 'send_at', at)
return at - now
