"""What the upstream saying "not now" does. A 429 is about the account, not
the job: one pause per kind of call (submits, status GETs), kept in Redis for
every worker, that only grows (worker/lua/back_in_line.lua, extend_pause.lua).
A POST whose refusal came after its step gave up waiting is revived here.
"""
from __future__ import annotations

import logging
import random
import time

from .admission import Admission, Dispatch
from .errors import RateLimited, UpstreamError
from .jobs import Job, JobStore
from .retry import requeue

log = logging.getLogger(__name__)

# A 429 without Retry-After pauses this long; a longer Retry-After is honoured
# up to the maximum.
DEFAULT_PAUSE_S, MAX_PAUSE_S = 10.0, 3600.0
# Paused polls resume spread over up to this long, not all at once.
RESUME_SPREAD_S = 10.0
# A late refusal may come before the step's failure lands: tried again after these.
REVIVE_WAITS_S = (0.2, 0.5, 1.0, 2.0, 5.0)


def pause_s(error: RateLimited) -> float:
    retry_after = error.retry_after if error.retry_after is not None else DEFAULT_PAUSE_S
    return min(max(retry_after, 1.0), MAX_PAUSE_S)


def spread(pause: float) -> float:
    return random.uniform(0, min(pause, RESUME_SPREAD_S))


def revive_refused(store: JobStore, admission: Admission, dispatch: Dispatch, job: Job,
                   error: UpstreamError) -> None:
    """The POST's answer came after its step gave up and failed the job
    "outcome unknown"; it proves nothing was created (a 429, a 503, a 4xx):
    the job goes back to its line, to be POSTed again (after the pause, for a
    429), so it holds no slot for a generation that does not exist; a 4xx
    then fails it again at once, with the upstream's reason."""
    if isinstance(error, RateLimited):
        store.pause_submits(pause_s(error))
    for wait in REVIVE_WAITS_S:
        answer = requeue(admission, dispatch, job.batch, [job.id])
        if answer.get("requeued"):
            log.warning("job %s: its POST was refused after the deadline (%s): nothing was "
                        "created, back in line", job.ref, error)
            return
        if not answer.get("not_failed"):
            return  # cancelled meanwhile, or another answer: nothing to revive
        time.sleep(wait)
