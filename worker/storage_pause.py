"""Storage that cannot take videos (a full disk, an S3 endpoint down) stops
new POSTs. Paid videos keep waiting for it (their result links live ~24 h);
buying more of them meanwhile only adds to what may be lost. A storage
failure, at a download or at a submit's resume check, pauses submits for
every worker for `VIDQ_BACKOFF_CAP_S` (the 429 pause: it only grows) and says
why in `keys.STORAGE_FAILING`, read by `vidq status`; a job not yet POSTed
goes back to the front of its line, spending no attempt, so a night's S3
outage does not fail the prompts admitted during it.

A job pauses submits so at most `PAUSES_PER_JOB` times. Past that, a job
not yet POSTed is retried like any failure (spending attempts): nothing of
it is paid, and its error may be its own (its batch's prefix denied). A
paid job goes on renewing the pause, for twice `VIDQ_BACKOFF_CAP_S` (its
retries come up to that cap apart, plus the download: the pause must not
lapse between them), unless a video was stored since its storage failures
began: then the store works, and the error is its own (one object refused,
one video too big) and stalls nothing. Only a stored video tells: a store
may take a small test write and refuse every video (a quota, a disk our own
videos filled), or refuse a test write where videos go (a policy granting
only batch prefixes); review 111 broke both kinds of probe. So a paid job
whose error is its own, with no other video stored since (nothing else in
flight), holds submits until space is made or its hard limit, saying why.
The count and its start begin afresh when the job is POSTed or requeued
(lua/record_generation.lua, lua/requeue.lua): an earlier outage is no news
of this one (review 112). (Before, every job stopped pausing after its
three: a full disk's pause lapsed once the paid jobs had spent theirs, and a
night's batch was bought in waves of C while nothing could be stored;
helper 109.)
"""
from __future__ import annotations

import logging

from . import keys
from .errors import StorageError
from .jobs import Job, JobStore

log = logging.getLogger(__name__)

PAUSES_PER_JOB = 3
PAID_PAUSE = 2.0  # x VIDQ_BACKOFF_CAP_S, past a paid job's own PAUSES_PER_JOB


def storage_failing(store: JobStore, job: Job, error: StorageError, pause_s: float) -> bool:
    """Pause submits for every worker (unless this job has done so enough and
    the store is not to blame); True if `job` went back in line (it was not
    POSTed), False if it is to be retried as any failed step."""
    paid = bool(job.generation_id or job.extra.get("posting_at"))
    pauses, stored_since = _count_failure(store, job)
    if pauses > PAUSES_PER_JOB:
        if not paid or stored_since:
            return False
        pause_s *= PAID_PAUSE
    first = not store.redis.exists(keys.STORAGE_FAILING)
    store.redis.set(keys.STORAGE_FAILING, str(error)[:300], px=max(1, int(pause_s * 1000)))
    store.pause_submits(pause_s)
    if first:
        log.error("storage failing (%s): no new POSTs for every worker until it works; "
                  "paid videos wait for it", error)
    if paid:
        return False
    store.back_in_line(job, 0.0, rate_limited=False)
    return True


def _count_failure(store: JobStore, job: Job) -> tuple[int, bool]:
    """Count this failure (the first one's Redis time is kept on the job):
    how many so far, and whether a video was stored (lua/transition.lua)
    since the first."""
    seconds, micros = store.redis.time()
    pipe = store.redis.pipeline(transaction=False)
    pipe.hincrby(keys.job(job.ref), "storage_pauses", 1)
    pipe.hsetnx(keys.job(job.ref), "storage_failing_since", seconds + micros / 1e6)
    pipe.hget(keys.job(job.ref), "storage_failing_since")
    pipe.hget(keys.CONFIG, "video_stored_at")
    pauses, _, since, stored = pipe.execute()
    return int(pauses), stored is not None and float(stored) > float(since)
