-- Record the video being published for a job's generation (video.kept_video),
-- only while that generation is still the job's: never into a purged job's
-- hash (HSET would make it again), nor over one retired by a --resubmit since.
if redis.call('HGET', KEYS[1], 'generation_id') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'kept_sha256', ARGV[2], 'kept_bytes', ARGV[3],
  'kept_generation', ARGV[1])
return 1
