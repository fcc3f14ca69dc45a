"""Job records in Redis, and every atomic change to them.

Keys (prefix `vidq:`):
    job:<batch>:<id>      hash: one job's record (fields in `Job`)
    batch:<batch>         hash: created_at, total
    batch:<batch>:counts  hash: state -> number of jobs in it
    batch:<batch>:jobs    set of job ids
    batches               set of batch names
    admission             list of job refs waiting for an upstream slot
    slots                 zset: refs holding an upstream slot (score: admitted at)
    due                   zset: refs whose next step must have started by the score
    seq                   counter for step tokens

A step (submit, poll, download) runs only with the job's current token, which
it swaps atomically when it starts (`claim`); a duplicated or redelivered
message finds the token gone and does nothing, so a job has one chain.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import redis

PREFIX = "vidq:"
STATES = ("queued", "submitted", "generating", "downloading", "done", "failed")
FINAL_STATES = frozenset({"done", "failed"})

# KEYS: job, counts, due, slots, seq
# ARGV: ref, expected_token ('*' = any), new_state ('' = keep), next_step
#       ('' = chain ends), due_at, release_slot ('1'/'0'), field, value, ...
_TRANSITION = """
local job = KEYS[1]
if ARGV[2] ~= '*' and redis.call('HGET', job, 'token') ~= ARGV[2] then return false end
local old = redis.call('HGET', job, 'state')
if ARGV[3] ~= '' and ARGV[3] ~= old then
  redis.call('HINCRBY', KEYS[2], old, -1)
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  redis.call('HSET', job, 'state', ARGV[3])
end
if #ARGV > 6 then redis.call('HSET', job, unpack(ARGV, 7)) end
if ARGV[6] == '1' then redis.call('ZREM', KEYS[4], ARGV[1]) end
if ARGV[4] == '' then
  redis.call('HSET', job, 'token', '', 'step', '')
  redis.call('ZREM', KEYS[3], ARGV[1])
  return '0'
end
local token = tostring(redis.call('INCR', KEYS[5]))
redis.call('HSET', job, 'token', token, 'step', ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
return token
"""

# KEYS: job, due; ARGV: token, lease_until, ref. Swaps the token for
# 'run:<token>', leases the running step (the reconciler leaves it alone until
# then), and returns the record.
_CLAIM = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return false end
redis.call('HSET', KEYS[1], 'token', 'run:' .. ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: job, counts, due, slots; ARGV: generation_id, submitted_at, ref, recover_at.
# Never conditional on the token: a paid generation id is always kept, counted
# in flight, and due for a poll, even if this job's chain was ended meanwhile.
_RECORD_GENERATION = """
local known = redis.call('HGET', KEYS[1], 'generation_id')
if known and known ~= '' then
  if known ~= ARGV[1] then
    redis.call('HSET', KEYS[1], 'extra_generation_ids',
      (redis.call('HGET', KEYS[1], 'extra_generation_ids') or '') .. ARGV[1] .. ' ')
  end
  return known
end
local old = redis.call('HGET', KEYS[1], 'state')
redis.call('HINCRBY', KEYS[2], old, -1)
redis.call('HINCRBY', KEYS[2], 'submitted', 1)
redis.call('HSET', KEYS[1], 'generation_id', ARGV[1], 'submitted_at', ARGV[2],
  'state', 'submitted')
redis.call('ZADD', KEYS[3], 'NX', ARGV[4], ARGV[3])
redis.call('ZADD', KEYS[4], 'NX', ARGV[2], ARGV[3])
return ARGV[1]
"""


def job_ref(batch: str, job_id: str) -> str:
    return f"{batch}:{job_id}"


def job_key(ref: str) -> str:
    return f"{PREFIX}job:{ref}"


def counts_key(batch: str) -> str:
    return f"{PREFIX}batch:{batch}:counts"


@dataclass
class Job:
    """One job's record, as read from its hash."""

    batch: str
    id: str
    request: dict
    state: str
    token: str = ""
    step: str = ""
    generation_id: str = ""
    attempts: int = 0
    polls: int = 0
    enqueued_at: float = 0.0
    submitted_at: float = 0.0
    completed_at: float = 0.0
    video_url: str = ""
    last_error: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return job_ref(self.batch, self.id)

    @classmethod
    def from_hash(cls, data: dict) -> "Job":
        known = {k: data.get(k) for k in (
            "token", "step", "generation_id", "video_url", "last_error")}
        return cls(
            batch=data["batch"], id=data["id"], request=json.loads(data["request"]),
            state=data["state"], **{k: v or "" for k, v in known.items()},
            attempts=int(data.get("attempts") or 0), polls=int(data.get("polls") or 0),
            enqueued_at=float(data.get("enqueued_at") or 0),
            submitted_at=float(data.get("submitted_at") or 0),
            completed_at=float(data.get("completed_at") or 0),
            extra=data,
        )


class JobStore:
    """Reads and changes job records; every change is one atomic script."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        self._transition = client.register_script(_TRANSITION)
        self._claim = client.register_script(_CLAIM)
        self._record = client.register_script(_RECORD_GENERATION)

    def get(self, ref: str) -> Job | None:
        data = self.redis.hgetall(job_key(ref))
        return Job.from_hash(data) if data else None

    def claim(self, ref: str, token: str, lease_until: float) -> Job | None:
        """The job if `token` is current, after taking it; None for a stale message."""
        flat = self._claim(keys=[job_key(ref), PREFIX + "due"],
                           args=[token, repr(lease_until), ref])
        if not flat:
            return None
        return Job.from_hash(dict(zip(flat[::2], flat[1::2])))

    def record_generation(self, job: Job, generation_id: str, now: float,
                          recover_at: float) -> str:
        keys = [job_key(job.ref), counts_key(job.batch), PREFIX + "due", PREFIX + "slots"]
        return self._record(keys=keys, args=[generation_id, repr(now), job.ref, repr(recover_at)])

    def transition(self, job: Job, *, state: str = "", next_step: str = "",
                   due_at: float = 0.0, release_slot: bool = False,
                   expected_token: str | None = None, **values) -> str | None:
        """Apply one change; returns the next step's token, '0' if the chain
        ended, None if the job's token moved on (someone else owns it)."""
        expected = expected_token or job.token
        keys = [job_key(job.ref), counts_key(job.batch), PREFIX + "due",
                PREFIX + "slots", PREFIX + "seq"]
        args = [job.ref, expected, state, next_step, repr(due_at),
                "1" if release_slot else "0"]
        for name, value in values.items():
            args += [name, _encode(value)]
        return self._transition(keys=keys, args=args)

    def counts(self, batch: str) -> dict[str, int]:
        raw = self.redis.hgetall(counts_key(batch))
        return {state: int(raw.get(state, 0)) for state in STATES}

    def batch_total(self, batch: str) -> int:
        return int(self.redis.hget(f"{PREFIX}batch:{batch}", "total") or 0)

    def job_ids(self, batch: str) -> list[str]:
        return sorted(self.redis.smembers(f"{PREFIX}batch:{batch}:jobs"))


def _encode(value) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)
