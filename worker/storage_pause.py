"""Storage that cannot take videos (a full disk, an S3 endpoint down) stops
new POSTs. Paid videos keep waiting for it (their result links live ~24 h);
buying more of them meanwhile only adds to what may be lost. Each storage
failure, at a download or at a submit's resume check, pauses submits for
every worker for `VIDQ_BACKOFF_CAP_S` (the 429 pause: it only grows) and says why in
`keys.STORAGE_FAILING`, read by `vidq status`. A job not yet POSTed goes back
to the front of its line, spending no attempt: a night's S3 outage must not
fail the prompts that happened to be admitted during it.
"""
from __future__ import annotations

import logging

from . import keys
from .errors import StorageError
from .jobs import Job, JobStore

log = logging.getLogger(__name__)

def storage_failing(store: JobStore, job: Job, error: StorageError, pause_s: float) -> bool:
    """Pause submits for every worker; True if `job` went back in line (it was
    not POSTed), False if it is to be retried as any failed step."""
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
