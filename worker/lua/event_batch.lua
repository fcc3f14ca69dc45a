-- After-step of a batch's manifest mark (worker/events.py runs both in one
-- call): the mark is the moment a batch is recorded finished, so
-- `batch.finished` is announced exactly when it succeeds. A batch reopened
-- and finished again is marked, and announced, again.
local function event_before(KEYS, ARGV)
  return nil
end

local function event_after(KEYS, ARGV, before, result)
  if result ~= 1 then return end
  local batch = string.sub(KEYS[1], #NS.batch + 1)
  local counts = redis.call('HMGET', KEYS[2], STATE.done, STATE.failed, STATE.cancelled)
  local total = redis.call('HGET', KEYS[1], 'total') or '0'
  redis.call('XADD', EVENT_STREAM, '*', 'v', EVENT_VERSION, 'type', EVENT.batch_finished,
    'at', event_now(), 'batch', batch, 'total', total, 'done', counts[1] or '0',
    'failed', counts[2] or '0', 'cancelled', counts[3] or '0', 'manifest_url', EVENT_EXTRA)
end
