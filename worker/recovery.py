"""Recovery: steps a worker took with it when it died, sent again.

A worker that dies takes its countdown tasks with it. `reconcile` finds steps
that should have started and did not (past their due time), and steps held by
a worker whose heartbeat has expired, and sends them again under a new token;
the slot stays held, since the upstream may still be generating, so the cap is
never exceeded by a recovery.
"""
from __future__ import annotations

import logging

import redis

from . import keys
from .admission import CAP_PROBE_FACTOR, CAP_QUIET_S, Admission, Dispatch, admit
from .jobs import FINAL_STATES, Job, State, Step
from .metrics_record import resent as resent_metric

log = logging.getLogger(__name__)


def resume_step(job: Job) -> Step:
    """The step a job whose chain was lost must take next."""
    if job.state == State.DOWNLOADING:
        return Step.DOWNLOAD
    if job.generation_id:
        return Step.POLL
    return Step.SUBMIT


def lost_steps(admission: Admission, now: float, limit: int = 1000) -> list[str]:
    """Refs past their due time, and refs held by a worker that is gone."""
    client = admission.redis
    entries: list[tuple[str, float]] = client.zrange(keys.DUE, 0, limit - 1,
                                                     withscores=True)  # type: ignore[assignment]
    lost = [ref for ref, due_at in entries if due_at <= now]
    waiting = [ref for ref, due_at in entries if due_at > now]
    if not waiting:
        return lost
    holders = client.pipeline(transaction=False)
    for ref in waiting:
        holders.hmget(keys.job(ref), "holder", "token")
    held_by = dict(zip(waiting, holders.execute(), strict=True))
    names = sorted({name for name, _token in held_by.values() if name})
    beats = dict(zip(names, client.mget([keys.worker_alive(n) for n in names]), strict=True))
    return lost + [ref for ref, (name, token) in held_by.items()
                   if name and not _will_run(beats[name], token or "")]


def _will_run(beat: str | None, token: str) -> bool:
    """Whether the holder with this heartbeat runs the step: a stopping
    worker (worker/draining.py) only the steps its pool claimed."""
    return bool(beat) and (beat != keys.STOPPING_WORKER or token.startswith("run:"))


def reconcile(admission: Admission, dispatch: Dispatch, start_grace_s: float) -> int:
    """Re-send every lost step, free expired holds and fill free slots;
    returns steps re-sent. One bad record never stops the pass."""
    resent, now = 0, admission.store.now()
    for ref in lost_steps(admission, now):
        try:
            resent += _resend(admission, dispatch, start_grace_s, ref)
        except (redis.ResponseError, ValueError, KeyError, TypeError) as exc:
            # A record this code cannot read: say so once a grace period, and
            # go on with the others.
            log.error("reconciler: cannot recover %s: %s", ref, exc)
            admission.redis.zadd(keys.DUE, {ref: now + start_grace_s})
    resent_metric(admission.redis, resent)
    admission.release_expired_holds()
    admission.store.grow_cap(CAP_PROBE_FACTOR, CAP_QUIET_S, completed=False)
    admit(admission, dispatch)
    return resent


def _resend(admission: Admission, dispatch: Dispatch, start_grace_s: float, ref: str) -> int:
    job = admission.store.get(ref)
    if job is None or job.state in FINAL_STATES:
        admission.redis.zrem(keys.DUE, ref)
        return 0
    step = resume_step(job)
    # Compare-and-set on the token read above: a step that moved on (or ended
    # the job) meanwhile is left alone.
    token = admission.store.transition(job, next_step=step, due_in_s=start_grace_s,
                                       expected_token=job.token, recovered="1")
    if token is None:
        return 0
    log.warning("re-sending %s for job %s (its chain was lost)", step, ref)
    dispatch(step, ref, token, 0.0)
    return 1
