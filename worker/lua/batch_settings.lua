-- Change a batch's admission settings (ARGV: the batch, '1' if it must
-- exist already, then field, value pairs; an empty value removes the field):
-- priority, paused, max_credits, max_videos. A spend-cap hold is lifted, so
-- the pump checks the caps again, and the batch goes back in its ring (its
-- new priority's) if it may be served now.
-- Returns 1 if the batch is in a ring afterwards, 0 if not, -1 if it had to
-- exist and has no job: `vidq pause` checked it, then a purge ended; written
-- now, a stray `paused` outlived the batch and held the next one of its name.
local batch_hash_key = KEYS[1]
local batch = ARGV[1]
if ARGV[2] == '1' and redis.call('HEXISTS', batch_hash_key, 'total') == 0 then return -1 end
local old_priority = redis.call('HGET', batch_hash_key, 'priority') or 'normal'

for i = 3, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', batch_hash_key, ARGV[i])
  else
    redis.call('HSET', batch_hash_key, ARGV[i], ARGV[i + 1])
  end
end
redis.call('HDEL', batch_hash_key, 'blocked')
local priority = redis.call('HGET', batch_hash_key, 'priority') or 'normal'
if priority ~= old_priority and redis.call('HGET', batch_hash_key, 'in_ring') == '1' then
  -- Into the new priority's ring now: left in the old one, a batch raised to
  -- high would wait until the pump reached it in, say, the low ring.
  redis.call('LREM', NS.ring .. old_priority, 0, batch)
  redis.call('HSET', batch_hash_key, 'in_ring', '0')
end
wake(batch, false)
if redis.call('HGET', batch_hash_key, 'in_ring') == '1' then return 1 end
return 0
