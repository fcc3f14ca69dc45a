-- Shared by the scripts that pause calls for every worker.
-- Pause `key` for at least `pause_ms` from now: a pause only grows, so a
-- later, shorter Retry-After does not cut a longer one short.
local function extend_pause(key, pause_ms)
  if redis.call('PTTL', key) < pause_ms then redis.call('SET', key, '1', 'PX', pause_ms) end
end
