-- Remove some of a purged batch's jobs (worker/retention.py), each with its
-- slot, due time and hold, in one call. A job whose generation may still be
-- running upstream keeps its slot taken, as a POST of unknown outcome does
-- (lua/release_holds.lua frees it): freed at once, the pump gave it to
-- another job while the upstream still ran this one, and C was passed. That
-- is a job holding a slot with a generation id nobody saw complete, or with
-- a POST marker and no id (its answer is not known), or one already held as
-- an unknown POST. Its slot and hold go under a name of their own,
-- '<ref>#<generation id>' or '<ref>#<its POST's marker call id>' (a late
-- refusal of that POST ends the hold, lua/clear_posting.lua), never the
-- ref: the same name enqueued again must not share them. The hold lasts
-- until an existing one's end, else its ARGV seconds from now (the job's
-- unknown-POST hold, VIDQ_DEADLINE_S if '').
-- What an admitted job committed against today's credit cap goes too: spent
-- if its generation may run (it may be charged; nothing will settle it now),
-- else given back. Left committed, it held the daily cap until midnight.
-- ARGV: default hold seconds, then ref, hold seconds ('' = default) per job.
-- Returns {job records removed, slots kept as holds}. Sent again after a
-- lost reply, it finds the jobs gone and changes nothing.
local slots_key, due_key, holds_key = KEYS[1], KEYS[2], KEYS[3]
local default_hold_s = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

-- `unanswered`: the hold name of a POST with no answer yet, whose booking a
-- late refusal gives back (lua/clear_posting.lua).
local function settle_purged(job_key, may_run, unanswered)
  local f = redis.call('HMGET', job_key, 'credits_pending', 'spend_day', 'unknown_booked')
  if not f[2] then return end
  if not f[1] then
    -- Failed "outcome unknown" already: settle.lua booked it as spent, and
    -- undo_unknown.lua, which would give it back, needs the job kept here.
    if unanswered and f[3] then redis.call('HSET', NS.purged, unanswered, f[2] .. ' ' .. f[3]) end
    return
  end
  local pending = tonumber(f[1]) or 0
  redis.call('HINCRBYFLOAT', NS.spend .. f[2], 'committed', -pending)
  if may_run and pending > 0 then
    redis.call('HINCRBYFLOAT', NS.spend .. f[2], 'spent', pending)
    if unanswered then redis.call('HSET', NS.purged, unanswered, f[2] .. ' ' .. pending) end
  end
end

local removed, held = 0, 0
for i = 2, #ARGV, 2 do
  local ref = ARGV[i]
  local job_key = NS.job .. ref
  local taken = redis.call('ZSCORE', slots_key, ref)
  local f = redis.call('HMGET', job_key, 'generation_id', 'completed_at', 'posting_at',
                       'posting_op')
  local id, done, posting, op = f[1] or '', f[2] or '', f[3] or '', f[4] or ''
  local hold_until = redis.call('ZSCORE', holds_key, ref)
  local may_run = hold_until or (id ~= '' and done == '') or (id == '' and posting ~= '')
  settle_purged(job_key, may_run, id == '' and op ~= '' and (ref .. '#' .. op))
  if taken then
    if may_run then
      if not hold_until then
        hold_until = now + (tonumber(ARGV[i + 1]) or default_hold_s)
      end
      local suffix = id ~= '' and id or (op ~= '' and op or (posting ~= '' and posting or 'purged'))
      local name = ref .. '#' .. suffix
      redis.call('ZADD', holds_key, hold_until, name)
      redis.call('ZADD', slots_key, taken, name)
      -- Its id known: asked about once the hold runs out (worker/purged_looks.py).
      if id ~= '' then redis.call('HSET', NS.purged_generations, name, id) end
      held = held + 1
    end
  end
  redis.call('ZREM', slots_key, ref)
  redis.call('ZREM', due_key, ref)
  redis.call('ZREM', holds_key, ref)
  removed = removed + redis.call('UNLINK', job_key)
end
return {removed, held}
