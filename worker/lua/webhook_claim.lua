-- Take attempt ARGV[1] of a webhook delivery: pending at that attempt, it
-- becomes attempt + 1, due (KEYS[2]) by the end of the lease ARGV[2]; the
-- record is returned. A duplicated or outdated message gets nothing. The same
-- call sent again (its reply was lost; ARGV[3] is its id) finds its own id
-- and gets the record: it is the claim it made, not a duplicate.
local delivery_key, due_key = KEYS[1], KEYS[2]
local attempt, lease_s, op, ident = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local state, attempts, last_op = unpack(redis.call('HMGET', delivery_key, 'state', 'attempts',
  'claim_op'))
if state ~= 'pending' then return false end
local again = tonumber(attempts) == attempt + 1 and last_op == op
if not again then
  if tonumber(attempts) ~= attempt then return false end
  local now = redis.call('TIME')
  redis.call('HSET', delivery_key, 'attempts', attempt + 1, 'claim_op', op)
  redis.call('ZADD', due_key, now[1] + now[2] / 1e6 + lease_s, ident)
end
return redis.call('HGETALL', delivery_key)
