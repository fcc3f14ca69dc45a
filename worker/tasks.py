"""Thin Celery tasks: claim the job, run its step, decide retry or failure.

Messages carry a job ref and a step token, never a prompt or a secret.
"""
from __future__ import annotations

import logging
import os

from .admission import Admission
from .celery_app import TASK_FOR_STEP, app, settings_of
from .durability import Durability
from .errors import (
    CorruptVideo,
    PermanentUpstreamError,
    ResultLinkExpired,
    RetryableUpstreamError,
    StorageError,
    SubmitOutcomeUnknown,
)
from .jobs import OUTCOME_UNKNOWN, JobStore, connect
from .pipeline import Steps
from .schedule import DurationModel
from .settings import Settings
from .storage import open_storage
from .upstream import UpstreamClient

log = logging.getLogger(__name__)
_steps: dict[int, Steps] = {}


def dispatch(step: str, ref: str, token: str, countdown: float) -> None:
    task = app.tasks[TASK_FOR_STEP[step]]
    task.apply_async((ref, token), countdown=countdown if countdown > 0 else None)


def get_steps(worker_name: str = "local") -> Steps:
    """This process's Steps (a Redis client and HTTP session do not survive fork)."""
    steps = _steps.get(os.getpid())
    if steps is None:
        steps = build_steps(settings_of(app), worker_name)
        _steps.clear()
        _steps[os.getpid()] = steps
    return steps


def build_steps(settings: Settings, worker_name: str = "local") -> Steps:
    client = connect(settings.redis_url)
    store = JobStore(client)
    return Steps(
        settings=settings, store=store, admission=Admission(store, settings.step_grace_s),
        client=UpstreamClient(settings), storage=open_storage(settings.storage_url),
        durations=DurationModel(client, settings.expected_generation_s), dispatch=dispatch,
        durability=Durability.probe(client), worker_name=worker_name,
    )


def run_step(step: str, ref: str, token: str, worker_name: str) -> None:
    steps = get_steps(worker_name)
    job = steps.claim(ref, token, step)
    if job is None:
        log.info("%s for %s: stale token %s, nothing to do", step, ref, token)
        return
    try:
        getattr(steps, step)(job)
    except ResultLinkExpired as exc:
        steps.refresh_link(job, exc)
    except SubmitOutcomeUnknown as exc:
        steps.fail(job, f"{OUTCOME_UNKNOWN}: {exc}")
    except (RetryableUpstreamError, CorruptVideo, StorageError) as exc:
        steps.retry(job, exc)
    except PermanentUpstreamError as exc:
        steps.fail(job, f"{step}: {exc}")
    except Exception as exc:
        # A bug or an odd record: counted like any failure, so the job ends
        # (failed, with this reason) instead of being re-sent forever.
        log.exception("job %s: %s raised unexpectedly", ref, step)
        steps.retry(job, RuntimeError(f"unexpected {type(exc).__name__}: {exc}"))


@app.task(name=TASK_FOR_STEP["submit"], bind=True)
def submit(self, ref: str, token: str) -> None:
    """POST the job upstream (once ever), then schedule its first poll."""
    run_step("submit", ref, token, self.request.hostname or "local")


@app.task(name=TASK_FOR_STEP["poll"], bind=True)
def poll(self, ref: str, token: str) -> None:
    """GET the generation's status; reschedule, download or fail."""
    run_step("poll", ref, token, self.request.hostname or "local")


@app.task(name=TASK_FOR_STEP["download"], bind=True)
def download(self, ref: str, token: str) -> None:
    """Stream the finished video into storage and write its sidecar."""
    run_step("download", ref, token, self.request.hostname or "local")
