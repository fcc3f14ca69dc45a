"""Thin Celery tasks: claim the job, run its step, decide retry or failure.

Messages carry a job ref and a step token, never a prompt or a secret.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

import redis
from billiard.exceptions import WorkerLostError
from celery.signals import task_postrun, worker_process_shutdown
from celery.worker.request import Request

from . import metrics_record
from .admission import Admission
from .celery_app import TASK_FOR_STEP, app, settings_of
from .connection import connect
from .durability import Durability
from .durations import DurationModel
from .errors import (
    CorruptVideo,
    MarkerUnconfirmed,
    PermanentUpstreamError,
    ResultLinkExpired,
    RetryableUpstreamError,
    StorageError,
    SubmitOutcomeUnknown,
    VidqError,
)
from .jobs import OUTCOME_UNKNOWN, JobStore
from .paid_journal import PaidJournal, replay_now
from .pipeline import Steps
from .settings import Settings
from .spend import CreditEstimates
from .storage import open_storage
from .storage_pause import storage_failing
from .upstream import UpstreamClient

log = logging.getLogger(__name__)
_steps: dict[int, Steps] = {}
# This worker instance: hostname and main pid, set when the worker starts and
# inherited by its pool children. A restarted worker with the same name is a
# different instance, so the jobs the dead one held are seen as orphaned.
WORKER_ID = {"name": "local"}


def worker_id() -> str:
    return WORKER_ID["name"]


def dispatch(step: str, ref: str, token: str, countdown: float) -> None:
    task = app.tasks[TASK_FOR_STEP[step]]
    task.apply_async((ref, token), countdown=countdown if countdown > 0 else None)


def get_steps() -> Steps:
    """This process's Steps (a Redis client and HTTP session do not survive fork)."""
    steps = _steps.get(os.getpid())
    if steps is None:
        steps = build_steps(settings_of(app), worker_id())
        _steps.clear()
        _steps[os.getpid()] = steps
    return steps


@task_postrun.connect
def _flush_metrics(**_kwargs) -> None:
    """A step's counts go to Redis in one pipeline as its task ends
    (worker/metrics_record.py: connected here, so that importing that module,
    as `vidq` commands do, imports no Celery)."""
    if metrics_record.RECORDER.pending():
        metrics_record.RECORDER.flush(get_steps().store.redis)


@worker_process_shutdown.connect
def _flush_metrics_at_exit(**_kwargs) -> None:
    with contextlib.suppress(Exception):
        _flush_metrics()


def build_steps(settings: Settings, worker_name: str = "local") -> Steps:
    client = connect(settings.redis_url)
    store = JobStore(client)
    return Steps(
        settings=settings, store=store,
        admission=Admission(store, settings.step_grace_s,
                            CreditEstimates.from_settings(settings), settings.deadline_s,
                            settings.hard_limit_s),
        client=UpstreamClient(settings),
        storage=open_storage(settings.storage_url, settings.s3_part_bytes),
        durations=DurationModel(client, settings.expected_generation_s), dispatch=dispatch,
        durability=Durability.probe(client), worker_name=worker_name,
        journal=PaidJournal(Path(settings.journal_dir)),
    )


class JobFailed(VidqError):
    """Raised by a task after its step recorded the job as failed, so that
    Celery, and Flower, show the task as failed with the job's reason. The
    message is acknowledged all the same (acks_late acks failures), never
    redelivered."""


def run_step(steps: Steps, step: str, ref: str, token: str) -> str:
    """Run one step; returns a one-line summary for Flower's Result column."""
    job = steps.claim(ref, token, step)
    if job is None:
        log.info("%s for %s: stale token %s, nothing to do", step, ref, token)
        return f"{ref}: stale message, nothing to do"
    _run(steps, step, job)
    summary = f"{ref} {job.outcome or step} | {batch_line(steps, job.batch)}"
    if job.failed:
        raise JobFailed(summary)
    return summary


def batch_line(steps: Steps, batch: str) -> str:
    """The batch's progress; "waiting" is its jobs still waiting for a slot,
    the figure Flower's Broker page shows for the batch (worker/flower_backlog.py)."""
    counts = steps.store.counts(batch)
    total = steps.store.batch_total(batch)
    return (f"batch {counts['done']:,}/{total:,} done, {counts['failed']:,} failed, "
            f"{steps.admission.waiting(batch):,} waiting")


def _run(steps: Steps, step: str, job) -> None:
    try:
        getattr(steps, step)(job)
    except ResultLinkExpired as exc:
        steps.refresh_link(job, exc)
    except SubmitOutcomeUnknown as exc:
        steps.fail(job, f"{OUTCOME_UNKNOWN}: {exc}")
    except (RetryableUpstreamError, CorruptVideo, MarkerUnconfirmed) as exc:
        steps.unavailable(job, exc)
    except StorageError as exc:
        if not storage_failing(steps.store, job, exc, steps.settings.backoff_cap_s):
            steps.retry(job, exc)
    except PermanentUpstreamError as exc:
        steps.rejected(job, exc)
    except Exception as exc:
        # A bug or an odd record: counted like any failure, so the job ends
        # (failed, with this reason) instead of being re-sent forever; a paid
        # one at the hard limit, like any failure of a paid job.
        log.exception("job %s: %s raised unexpectedly", job.ref, step)
        steps.retry(job, RuntimeError(f"unexpected {type(exc).__name__}: {exc}"))


class StepRequest(Request):
    """A step's message in the worker's main process. A pool child that died
    running it (the OOM killer, a crash) left the job's step claimed: the step
    is made due now, for the next reconciler pass, not a step grace later
    (review 93: four slots idle 85 s after four children were killed)."""

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        lost = getattr(exc_info.exception, "exc", exc_info.exception)  # ExceptionWithTraceback
        if isinstance(lost, WorkerLostError) and len(self.args) >= 2:
            # In a thread: a Redis stall must not hold the worker's event loop.
            threading.Thread(target=step_lost, args=(self.name, *self.args[:2], lost),
                             name="vidq lost step", daemon=True).start()
        return super().on_failure(exc_info, send_failed_event, return_ok)


def step_lost(name: str, ref: str, token: str, lost: BaseException) -> None:
    """The claim a dead pool child held, made due now. The child may have
    died holding a paid id that Redis has not got yet (its journal): that is
    recorded first, else the step re-sent finds the marker and no id, with no
    POST left to answer, and fails the job "outcome unknown" until the
    journal's next pass (every 30 s) revives it."""
    steps = get_steps()
    replay_now(Path(steps.settings.journal_dir), steps.store, steps.durability)
    try:
        if steps.store.step_lost(ref, token):
            log.warning("%s for %s: its pool child died running it (%s); re-sent by "
                        "the next reconciler pass", name, ref, lost)
    except redis.RedisError as exc:  # the step grace re-sends it all the same
        log.warning("could not mark the lost step of %s: %s", ref, exc)


STEP_REQUEST = f"{__name__}:StepRequest"


# JobFailed is an expected outcome: Celery logs it in one line, no traceback.
@app.task(name=TASK_FOR_STEP["submit"], throws=(JobFailed,), Request=STEP_REQUEST)
def submit(ref: str, token: str) -> str:
    """POST the job upstream (once ever), then schedule its first poll."""
    return run_step(get_steps(), "submit", ref, token)


@app.task(name=TASK_FOR_STEP["poll"], throws=(JobFailed,), Request=STEP_REQUEST)
def poll(ref: str, token: str) -> str:
    """GET the generation's status; reschedule, download or fail."""
    return run_step(get_steps(), "poll", ref, token)


@app.task(name=TASK_FOR_STEP["download"], throws=(JobFailed,), Request=STEP_REQUEST)
def download(ref: str, token: str) -> str:
    """Stream the finished video into storage and write its sidecar."""
    return run_step(get_steps(), "download", ref, token)
