-- Mark a batch's manifest as written, if the batch is still exactly as it was
-- when the writer started: same reopen count and total (`stamp`), and every
-- job still in a final state. A batch reopened meanwhile (a retry, a late
-- generation id, new jobs) is left unmarked, so its next finish writes again.
-- Returns 1 if marked, 0 if not; 2 if this very call marked it already (its
-- reply was lost and it was sent again: marked, and announced only once).
local batch_key, counts_key = KEYS[1], KEYS[2]
local stamp = ARGV[1]            -- '<reopened>:<total>' when the writer started
local retention_s = tonumber(ARGV[2])
local op = ARGV[3]

if redis.call('HGET', batch_key, 'manifest_op') == op then return 2 end

if not finished_as_stamped(batch_key, counts_key, stamp) then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', batch_key, 'manifest_of', stamp, 'manifest_at', string.format('%.6f', now),
  'expires_at', string.format('%.6f', now + retention_s), 'manifest_op', op)
return 1
