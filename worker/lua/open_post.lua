-- A POST on the wire, for `vidq purge`: while its answer may still come (a
-- late generation id needs its job), the batch is not purged. ARGV: the entry
-- (`<ref>#<its marker's call id>`: one per POST),
-- lease in ms, '1' to add or renew (the POST thread renews it every third of
-- the lease), '0' when the answer is in, and the step's running token. Scores
-- are Redis time in ms, so a worker that dies mid-POST stops counting once
-- its lease ends. Added with a token (just before the POST is sent): returns
-- 0 and adds nothing if the job is no longer that step's (its worker stood
-- still and another took the job over: the POST must not go).
local key, job_key = KEYS[1], KEYS[2]
local entry, lease_ms, token = ARGV[1], tonumber(ARGV[2]), ARGV[4] or ''
if ARGV[3] == '0' then
  redis.call('ZREM', key, entry)
  return 0
end
if token ~= '' and redis.call('HGET', job_key, 'token') ~= token then return 0 end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
redis.call('ZADD', key, now_ms + lease_ms, entry)
redis.call('PEXPIRE', key, 2 * lease_ms)
return 1
