"""One POST of a job, bounded by a deadline, whose answer is never lost.

The POST runs in a thread that records the generation id the moment the
upstream answers, even after the step gave up waiting (VIDQ_POST_DEADLINE_S):
a late id revives the job, and the generation it names is polled and
downloaded. Recording retries through a Redis outage, because the id of a
paid generation is the one thing that must not be dropped.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .errors import RequestRejected, RetryableUpstreamError, SubmitOutcomeUnknown
from .jobs import Job, JobStore
from .settings import Settings
from .upstream import Generation, UpstreamClient

log = logging.getLogger(__name__)

RECORD_RETRY_S = (0.2, 1.0, 2.0, 5.0)


def post_once(client: UpstreamClient, store: JobStore, job: Job, settings: Settings,
              refused_late: Callable[[RetryableUpstreamError], None] | None = None
              ) -> Generation:
    """POST `job` once; its generation id is recorded before this returns. An
    answer that proves nothing was created (a 429, a 503) but comes after the
    step gave up is handed to `refused_late`: the job failed "outcome
    unknown", and now it is known."""
    outcome: dict = {}
    done = threading.Event()
    lock, gave_up = threading.Lock(), threading.Event()

    def post() -> None:
        try:
            try:
                generation = client.submit(job.request)
            except (RetryableUpstreamError, RequestRejected) as exc:
                store.clear_posting(job)  # the upstream surely created nothing
                with lock:
                    late = gave_up.is_set()
                if late and refused_late and isinstance(exc, RetryableUpstreamError):
                    refused_late(exc)
                raise
            job.generation_id = record_paid(store, job, generation.id, settings.step_grace_s)
            outcome["generation"] = generation
        except BaseException as exc:  # handed to the waiting step below
            outcome["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=post, name=f"post {job.ref}", daemon=True)
    thread.start()
    finished = done.wait(settings.post_deadline_s)
    with lock:
        if not (finished or done.is_set()):
            gave_up.set()
    if gave_up.is_set():
        raise SubmitOutcomeUnknown(
            f"no complete answer to the POST within {settings.post_deadline_s:.0f} s; "
            "not re-sent (a late answer is still recorded)")
    error = outcome.get("error")
    if error is not None:
        raise error
    log.info("job %s submitted as generation %s", job.ref, job.generation_id)
    return outcome["generation"]


def record_paid(store: JobStore, job: Job, generation_id: str, lease_s: float) -> str:
    """Store a paid generation id, through a Redis outage if need be."""
    for pause in (*RECORD_RETRY_S, *([10.0] * 360)):
        try:
            return store.record_generation(job, generation_id, lease_s)
        except Exception as exc:
            log.error("job %s: generation %s not recorded yet (%s); retrying",
                      job.ref, generation_id, exc)
            time.sleep(pause)
    raise RuntimeError(f"generation {generation_id} of {job.ref} could not be recorded")
