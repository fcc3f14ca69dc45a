"""Storage that cannot take videos (a full disk, an S3 endpoint down) stops
new POSTs. Paid videos keep waiting for it (their result links live ~24 h);
buying more of them meanwhile only adds to what may be lost. A storage
failure, at a download or at a submit's resume check, pauses submits for
every worker for `VIDQ_BACKOFF_CAP_S` (the 429 pause: it only grows) and says
why in `keys.STORAGE_FAILING`, read by `vidq status`; a job not yet POSTed
goes back to the front of its line, spending no attempt, so a night's S3
outage does not fail the prompts admitted during it.

A job pauses submits so at most `PAUSES_PER_JOB` times on its own error. Past
that, the store itself is asked (`Storage.probe`: room for videos, a small
write): if it refuses, the outage is the store's, and the job renews the
pause, for twice `VIDQ_BACKOFF_CAP_S` (a paid job's retries come up to that
cap apart, plus the download: the pause must not lapse between them, or the
next C videos are bought), with the probe's reason, for as long as it lasts.
If the store takes the probe, the error is the job's own (one object
refused, one prefix denied, one video too big): it is retried like any
failure (an unpaid job then spends attempts) and stalls nothing. (Before,
every error stopped pausing after the job's three: a full disk's pause
lapsed once the paid jobs had spent theirs, and a night's batch was bought
in waves of C while nothing could be stored; helper 109. Telling the two
apart by the error instead stalled every batch on one batch's denied S3
prefix, or on one video too big for the disk; review 110.)
"""
from __future__ import annotations

import logging

from . import keys
from .errors import StorageError
from .jobs import Job, JobStore
from .storage import Storage

log = logging.getLogger(__name__)

PAUSES_PER_JOB = 3
STORE_DOWN_PAUSE = 2.0  # x VIDQ_BACKOFF_CAP_S


def storage_failing(store: JobStore, storage: Storage, job: Job, error: StorageError,
                    pause_s: float) -> bool:
    """Pause submits for every worker (unless this job's own error has done so
    enough); True if `job` went back in line (it was not POSTed), False if it
    is to be retried as any failed step."""
    if store.redis.hincrby(keys.job(job.ref), "storage_pauses", 1) > PAUSES_PER_JOB:
        try:
            storage.probe()
        except StorageError as down:  # the store's outage, not this job's error
            error, pause_s = down, pause_s * STORE_DOWN_PAUSE
        else:
            return False
    first = not store.redis.exists(keys.STORAGE_FAILING)
    store.redis.set(keys.STORAGE_FAILING, str(error)[:300], px=max(1, int(pause_s * 1000)))
    store.pause_submits(pause_s)
    if first:
        log.error("storage failing (%s): no new POSTs for every worker until it works; "
                  "paid videos wait for it", error)
    if job.generation_id or job.extra.get("posting_at"):
        return False
    store.back_in_line(job, 0.0, rate_limited=False)
    return True
