-- `vidq cancel`: mark the batch cancelled (the pump and every put-back
-- script then leave it alone) and end up to LIMIT of its waiting jobs
-- `cancelled`. Jobs already admitted are in flight and finish. Called again
-- until nothing is left in the line, so no call blocks Redis for long.
-- Returns {taken from the line, of which cancelled}; the same call sent
-- again (its reply was lost; `op` is its id) returns what it returned.
-- A waiting job whose earlier generation `vidq retry --resubmit` retired
-- unseen (`check_before_post`) is not cancelled: that generation may have
-- finished, paid for, so it is polled again at once, as any paid generation
-- of a cancelled batch is (review 116: it was left unfetched for good).
local batch_hash_key, line, counts_key = KEYS[1], KEYS[2], KEYS[3]
local slots_key, due_key = KEYS[4], KEYS[5]
local batch, limit, op = ARGV[1], tonumber(ARGV[2]), ARGV[3]

local last = redis.call('HMGET', batch_hash_key, 'cancel_op', 'cancel_out')
if last[1] == op then return cjson.decode(last[2]) end
-- Gone since `vidq cancel` checked it (a purge ended): marked now, a stray
-- hash of `cancelled` alone refused every later batch of the name, and
-- `vidq purge` found no batch to clear (review 137).
if redis.call('HEXISTS', batch_hash_key, 'total') == 0 then return {-1, 0} end
redis.call('HSET', batch_hash_key, 'cancelled', '1')
local t = redis.call('TIME')
local stamp = string.format('%s.%06d', t[1], tonumber(t[2]))
local taken = redis.call('ZPOPMIN', line, limit)
local cancelled = 0
for i = 1, #taken, 2 do
  local job_key = NS.job .. batch .. ':' .. taken[i]
  if redis.call('HGET', job_key, 'state') == STATE.queued
      and (redis.call('HGET', job_key, 'token') or '') == '' then
    local earlier = redis.call('HGET', job_key, 'check_before_post') or ''
    redis.call('HINCRBY', counts_key, STATE.queued, -1)
    if earlier ~= '' then
      redis.call('HSET', job_key, 'state', STATE.submitted, 'generation_id', earlier)
      redis.call('HDEL', job_key, 'check_before_post')
      redis.call('HINCRBY', counts_key, STATE.submitted, 1)
      poll_at_once(job_key, slots_key, due_key, batch .. ':' .. taken[i])
    else
      redis.call('HSET', job_key, 'state', STATE.cancelled, 'cancelled_at', stamp)
      redis.call('HINCRBY', counts_key, STATE.cancelled, 1)
      cancelled = cancelled + 1
    end
  end
end
local out = {#taken / 2, cancelled}
redis.call('HSET', batch_hash_key, 'cancel_op', op, 'cancel_out', cjson.encode(out))
return out
