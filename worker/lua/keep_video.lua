-- Record the video being published for a job's generation (video.kept_video),
-- only while that generation is still the job's: never into a purged job's
-- hash (HSET would make it again), nor over one retired by a --resubmit since.
-- And only by the step that owns the job (ARGV[4], its token): a copy taken
-- over (its worker frozen, or thought gone) must not publish over the video
-- its successor stored, maybe after the job was done (review 102). Returns
-- 0 if the token moved on, else 1 (recorded or not).
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[4] then return 0 end
if redis.call('HGET', KEYS[1], 'generation_id') ~= ARGV[1] then return 1 end
redis.call('HSET', KEYS[1], 'kept_sha256', ARGV[2], 'kept_bytes', ARGV[3],
  'kept_generation', ARGV[1])
return 1
