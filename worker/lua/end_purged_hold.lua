-- A purged generation's look (worker/purged_looks.py) found it ended: its
-- hold ends now, in the same step. Left to lua/release_holds.lua, it was
-- judged as an unknown POST's hold and kept while a later job ran and none
-- had been seen done: the slot sat idle for a whole generation (review 119).
-- Only if the hold is still this generation's: a hold that ended meanwhile
-- (its deadline) is not ended twice. Returns 1 if it ended the hold.
local holds_key, slots_key, name, id = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
if redis.call('HGET', NS.purged_generations, name) ~= id then return 0 end
redis.call('HDEL', NS.purged_generations, name)
redis.call('ZREM', holds_key, name)
redis.call('ZREM', slots_key, name)
return 1
