-- A POST on the wire, for `vidq purge`: while its answer may still come (a
-- late generation id needs its job), the batch is not purged. ARGV: ref,
-- lease in ms, '1' to add or renew (the POST thread renews it every third of
-- the lease), '0' when the answer is in. Scores are Redis time in ms, so a
-- worker that dies mid-POST stops counting once its lease ends.
local key, ref, lease_ms = KEYS[1], ARGV[1], tonumber(ARGV[2])
if ARGV[3] == '0' then
  redis.call('ZREM', key, ref)
  return 0
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
redis.call('ZADD', key, now_ms + lease_ms, ref)
redis.call('PEXPIRE', key, 2 * lease_ms)
return 1
