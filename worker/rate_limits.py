"""What the upstream saying "not now" does. A 429 is about the account, not
the job: one pause per kind of call (submits, status GETs), kept in Redis for
every worker, that only grows (worker/lua/back_in_line.lua, extend_pause.lua).
So are a 401 (the key) and a 403 (the credits) to a POST, once
`ACCOUNT_REFUSALS_TO_PAUSE` come in a row: one alone may be about its prompt
and fails its job, but credits running out at 2 a.m. must not fail the rest
of the night's prompts one by one. Submits then pause for `VIDQ_BACKOFF_CAP_S`
and are tried again, with the refused job first, until a POST is accepted;
each refusal spends one of the job's `VIDQ_MAX_ATTEMPTS`.
A POST whose refusal came after its step gave up waiting is revived here.
"""
from __future__ import annotations

import logging
import random
import time

from . import keys
from .admission import Admission, Dispatch, admit
from .contract import ACCOUNT_STATUSES
from .errors import RateLimited, RequestRejected, RetryableUpstreamError, UpstreamError
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
# 401/403 answers in a row, deployment-wide (any other answer to a POST ends
# a run), before submits pause: one alone may be about its prompt.
ACCOUNT_REFUSALS_TO_PAUSE = 3


def pause_s(error: RateLimited) -> float:
    retry_after = error.retry_after if error.retry_after is not None else DEFAULT_PAUSE_S
    return min(max(retry_after, 1.0), MAX_PAUSE_S)


def spread(pause: float) -> float:
    return random.uniform(0, min(pause, RESUME_SPREAD_S))


def account_refused(store: JobStore, job: Job, error: UpstreamError, pause: float,
                    max_attempts: int) -> bool:
    """Whether this refusal of `job`'s POST is about the account: submits then
    pause for every worker and `job` goes back to the front of its line,
    spending an attempt (so an upstream refusing some prompts with 401s
    cannot stall a batch for ever); False: it fails as a rejected prompt."""
    if not isinstance(error, RequestRejected) or error.status not in ACCOUNT_STATUSES:
        return False
    in_a_row = int(store.redis.get(keys.ACCOUNT_REFUSALS) or 0)
    if in_a_row < ACCOUNT_REFUSALS_TO_PAUSE or job.attempts + 1 >= max_attempts:
        return False
    store.redis.set(keys.PAUSE_SUBMIT_WHY, str(error), px=max(1, int(pause * 1000)))
    store.redis.hincrby(keys.job(job.ref), "attempts", 1)
    store.back_in_line(job, pause, rate_limited=False)
    log.error("the upstream refused the account (%s): submits paused %.0f s for every "
              "worker, then tried again; check the API key and the credits", error, pause)
    return True


def revive_refused(store: JobStore, admission: Admission, dispatch: Dispatch, job: Job,
                   error: UpstreamError) -> None:
    """The POST's answer came after its step gave up and failed the job
    "outcome unknown"; it proves nothing was created (a 429, a 503, a 4xx).
    What the unknown outcome booked (a held slot, credits, a video against
    max-videos) is undone. A 429 or 503 puts the job back in line, to be
    POSTed again (after the pause, for a 429); a 4xx fails it for good with
    the upstream's reason, as a timely one would have."""
    if isinstance(error, RateLimited):
        store.pause_submits(pause_s(error))
    final = not isinstance(error, RetryableUpstreamError)
    reason = f"submit: {error} (answered after the step gave up; nothing was created)"
    for wait in REVIVE_WAITS_S:
        undone = store.undo_unknown(job, reason)  # a requeue clears it
        if undone != "not_yet":
            break
        time.sleep(wait)
    if undone != "undone":
        return  # an id arrived, or a newer attempt runs: nothing to revive
    if not final and requeue(admission, dispatch, job.batch, [job.id]).get("requeued"):
        log.warning("job %s: its POST was refused after the deadline (%s): nothing was "
                    "created, back in line", job.ref, error)
        return
    log.warning("job %s: its POST was refused after the deadline (%s): nothing was "
                "created; failed", job.ref, error)
    admit(admission, dispatch)  # its slot is free
