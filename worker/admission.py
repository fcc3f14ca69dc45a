"""Admission: who may hold one of the upstream's C slots, and recovery.

Jobs wait in one Redis list; nothing is published for them until a slot is
free. `pump` moves jobs from the list into the slot set while fewer than C are
held, and only then does a submit task exist for them. A slot is freed when
its generation reaches a terminal status, so at most C generations are ever
in flight upstream, across every worker process and machine.

A worker that dies takes its countdown tasks with it. `reconcile` finds steps
that should have started and did not (the `due` set), and sends them again
under a new token; the slot stays held, since the upstream may still be
generating, so the cap is never exceeded by a recovery.
"""
from __future__ import annotations

import json
import logging
from typing import Callable, Iterable

import redis

from .jobs import FINAL_STATES, PREFIX, Job, JobStore, job_key, job_ref

log = logging.getLogger(__name__)

Dispatch = Callable[[str, str, str, float], None]  # (step, ref, token, countdown)

_PUMP = """
local out = {}
while redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) do
  local ref = redis.call('LPOP', KEYS[2])
  if not ref then break end
  local job = ARGV[4] .. 'job:' .. ref
  if redis.call('HGET', job, 'state') == 'queued' and not redis.call('ZSCORE', KEYS[1], ref) then
    local token = tostring(redis.call('INCR', KEYS[4]))
    redis.call('HSET', job, 'token', token, 'step', 'submit', 'admitted_at', ARGV[2])
    redis.call('ZADD', KEYS[1], ARGV[2], ref)
    redis.call('ZADD', KEYS[3], ARGV[3], ref)
    table.insert(out, ref)
    table.insert(out, token)
  end
end
return out
"""

# KEYS: job, batch jobs set, counts, admission, batch; ARGV: ref, id, batch, request, now
_ENQUEUE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'id', ARGV[2], 'batch', ARGV[3], 'request', ARGV[4],
  'state', 'queued', 'enqueued_at', ARGV[5])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[3], 'queued', 1)
redis.call('RPUSH', KEYS[4], ARGV[1])
redis.call('HINCRBY', KEYS[5], 'total', 1)
return 1
"""

SLOTS, ADMISSION, DUE, SEQ = (PREFIX + k for k in ("slots", "admission", "due", "seq"))


class Admission:
    """The global slot pool and the admission list."""

    def __init__(self, store: JobStore, max_in_flight: int, step_grace_s: float):
        self.store = store
        self.redis: redis.Redis = store.redis
        self.max_in_flight = max_in_flight
        self.step_grace_s = step_grace_s
        self._pump = self.redis.register_script(_PUMP)
        self._enqueue = self.redis.register_script(_ENQUEUE)

    def existing_requests(self, batch: str, job_ids: list[str]) -> dict[str, dict]:
        """The stored request of each id that already has a job in `batch`."""
        found: dict[str, dict] = {}
        for start in range(0, len(job_ids), 5000):
            chunk = job_ids[start:start + 5000]
            pipe = self.redis.pipeline(transaction=False)
            for job_id in chunk:
                pipe.hget(job_key(job_ref(batch, job_id)), "request")
            for job_id, raw in zip(chunk, pipe.execute()):
                if raw:
                    found[job_id] = json.loads(raw)
        return found

    def enqueue(self, batch: str, jobs: Iterable[tuple[str, dict]], now: float) -> int:
        """Write new jobs and put them in line; existing ids are left alone."""
        created = 0
        pipe = self.redis.pipeline(transaction=False)
        pending = 0
        for job_id, request in jobs:
            ref = job_ref(batch, job_id)
            keys = [job_key(ref), f"{PREFIX}batch:{batch}:jobs",
                    f"{PREFIX}batch:{batch}:counts", ADMISSION, f"{PREFIX}batch:{batch}"]
            args = [ref, job_id, batch, json.dumps(request, ensure_ascii=False), repr(now)]
            self._enqueue(keys=keys, args=args, client=pipe)
            pending += 1
            if pending >= 2000:
                created += sum(pipe.execute())
                pending = 0
        if pending:
            created += sum(pipe.execute())
        self.redis.sadd(PREFIX + "batches", batch)
        self.redis.hsetnx(f"{PREFIX}batch:{batch}", "created_at", repr(now))
        return created

    def requeue_failed(self, batch: str) -> int:
        """Put a batch's failed jobs back in line. A job that has a generation id
        goes on to poll it (and download a late video); none is POSTed twice."""
        requeued = 0
        for job_id in self.store.job_ids(batch):
            job = self.store.get(job_ref(batch, job_id))
            if job is None or job.state != "failed":
                continue
            if self.store.transition(job, state="queued", expected_token=job.token,
                                     last_error="", attempts=0, link_refreshes=0) is not None:
                self.redis.rpush(ADMISSION, job.ref)
                requeued += 1
        return requeued

    def pump(self, now: float) -> list[tuple[str, str]]:
        """Admit waiting jobs into free slots; returns (ref, token) to submit."""
        flat = self._pump(keys=[SLOTS, ADMISSION, DUE, SEQ],
                          args=[self.max_in_flight, repr(now),
                                repr(now + self.step_grace_s), PREFIX])
        return list(zip(flat[::2], flat[1::2]))

    def in_flight(self) -> int:
        return int(self.redis.zcard(SLOTS))

    def waiting(self) -> int:
        return int(self.redis.llen(ADMISSION))

    def overdue(self, now: float, limit: int = 500) -> list[str]:
        return self.redis.zrangebyscore(DUE, "-inf", now, start=0, num=limit)


def resume_step(job: Job) -> str:
    """The step a job whose chain was lost must take next."""
    if job.state == "downloading":
        return "download"
    if job.generation_id:
        return "poll"
    return "submit"


def reconcile(admission: Admission, dispatch: Dispatch, now: float,
              grace_for: Callable[[str], float]) -> int:
    """Re-send every overdue step and fill free slots; returns steps re-sent."""
    resent = 0
    for ref in admission.overdue(now):
        job = admission.store.get(ref)
        if job is None or job.state in FINAL_STATES:
            admission.redis.zrem(DUE, ref)
            continue
        step = resume_step(job)
        # Compare-and-set on the token read above: a step that moved on (or
        # ended the job) meanwhile is left alone.
        token = admission.store.transition(
            job, next_step=step, due_at=now + grace_for(step), expected_token=job.token)
        if token is None:
            continue
        log.warning("re-sending overdue %s for job %s (its chain was lost)", step, ref)
        dispatch(step, ref, token, 0.0)
        resent += 1
    for ref, token in admission.pump(now):
        dispatch("submit", ref, token, 0.0)
    return resent

