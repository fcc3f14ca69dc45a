-- Pause KEYS[1] for at least ARGV[1] ms (pause_lib). Returns the pause left.
extend_pause(KEYS[1], tonumber(ARGV[1]))
return redis.call('PTTL', KEYS[1])
