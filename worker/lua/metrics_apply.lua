-- Add counts and sums to the metrics hash, once per call id (KEYS[2], the
-- call's replay key): a call sent again after a lost reply finds its id and
-- changes nothing. ARGV: the replay key's TTL, the number of integer counts,
-- then field/amount pairs, integer counts first, then float sums.
local metrics_key, replay_key = KEYS[1], KEYS[2]
if not redis.call('SET', replay_key, '1', 'NX', 'EX', ARGV[1]) then return 0 end
local counts = tonumber(ARGV[2])
for i = 3, 2 + 2 * counts, 2 do redis.call('HINCRBY', metrics_key, ARGV[i], ARGV[i + 1]) end
for i = 3 + 2 * counts, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', metrics_key, ARGV[i], ARGV[i + 1])
end
return 1
