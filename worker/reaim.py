"""Re-aim first polls that a faster upstream has made too late.

When generations get faster mid-batch, every job already in flight keeps the
first poll it was given at submit, aimed at the old times: up to C videos then
sit finished, holding their slots, until those polls come. A countdown cannot
be moved, but a step token can be superseded: when the learned first aim of a
shape drops below `REAIM_SHARE` of the aim recorded at the last re-aim, each
in-flight job of that shape whose first poll is still pending and aimed later
gets a new token and a poll at the new aim. Its old message then finds a stale
token and does nothing (the same rule that makes redeliveries no-ops).

Cost: one read per in-flight job, only when the aim has dropped by a fifth;
two workers re-aiming at once is harmless (the token check lets one win).
"""
from __future__ import annotations

import logging

import redis

from . import keys
from .contract import shape_of
from .jobs import Job, JobStore, State, Step

log = logging.getLogger(__name__)

REAIM_SHARE = 0.8
MEMORY_S = 86400  # how long the last aim of a shape is remembered


def aim_dropped(client: redis.Redis, model: str, resolution: str, first_s: float) -> bool:
    """Whether the first aim fell below REAIM_SHARE of the last one remembered.
    Remembers the new aim when it rose, or when it fell that far."""
    key = keys.reaim(model, resolution)
    raw = client.get(key)
    last = float(raw) if raw else None
    dropped = last is not None and first_s < REAIM_SHARE * last
    if last is None or dropped or first_s > last:
        client.set(key, repr(first_s), ex=MEMORY_S)
    return dropped


def reaim_first_polls(store: JobStore, dispatch, shape: tuple[str, str], first_s: float,
                      min_s: float, grace_s: float) -> int:
    """Give pending first polls of `shape` aimed later than `first_s` a new
    poll at `first_s` after their submit; returns how many were re-aimed."""
    now = store.now()
    moved = 0
    for ref in store.redis.zrange(keys.SLOTS, 0, -1):
        job = store.get(str(ref))
        if job is None or not _first_poll_pending(job, shape, first_s, now):
            continue
        delay = max(first_s - (now - job.submitted_at), min_s)
        token = store.transition(job, next_step=Step.POLL, due_in_s=delay + grace_s,
                                 first_aim=repr(first_s))
        if token:
            dispatch(Step.POLL, ref, token, delay)
            moved += 1
    if moved:
        log.info("%s %s: generations got faster; %d pending first polls re-aimed at %.1f s",
                 *shape, moved, first_s)
    return moved


def _first_poll_pending(job: Job, shape: tuple[str, str], first_s: float, now: float) -> bool:
    aim = job.number("first_aim")
    # Not a poll running now (its token is 'run:...'): it is looking already,
    # and a second poll would race it.
    return (job.step == Step.POLL and job.polls == 0 and job.submitted_at > 0
            and not job.token.startswith("run:")
            and job.state in (State.SUBMITTED, State.GENERATING)
            and shape_of(job.request) == shape
            and aim > first_s / REAIM_SHARE and now - job.submitted_at < aim)
