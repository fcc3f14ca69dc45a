-- Mark a batch as being purged (worker/retention.py, begin_purge), if it is
-- still as its purger read it: finished, nothing added or reopened since
-- (ARGV[1], that mark's '<reopened>:<total>'; '' under --force: no check).
-- From then on no retry puts a job of it back in line, and no enqueue writes
-- one into it (lua/requeue.lua, lua/enqueue.lua): a job requeued while the
-- purge removed the batch went with it, its paid video never fetched, and
-- both commands said they had succeeded (review 136). The mark goes with the
-- batch's keys; a purge that stopped half-way leaves it until `vidq purge`
-- runs again. Returns 1 if marked, 0 if the batch changed.
local batch_key, counts_key = KEYS[1], KEYS[2]
local stamp = ARGV[1]

if stamp ~= '' and not finished_as_stamped(batch_key, counts_key, stamp) then return 0 end
redis.call('HSET', batch_key, 'purging', redis.call('TIME')[1])
return 1
