"""Thin Celery tasks: claim the job, run its step, decide retry or failure.

Messages carry a job ref and a step token, never a prompt or a secret.
"""
from __future__ import annotations

import logging
import os
import time

import redis

from .admission import Admission, reconcile
from . import app
from .celery_app import TASK_FOR_STEP
from .errors import (
    CorruptVideo,
    PermanentUpstreamError,
    ResultLinkExpired,
    RetryableUpstreamError,
    StorageError,
)
from .jobs import JobStore
from .pipeline import Steps
from .schedule import DurationModel
from .storage import open_storage
from .upstream import UpstreamClient

log = logging.getLogger(__name__)
_steps: dict[int, Steps] = {}


def dispatch(step: str, ref: str, token: str, countdown: float) -> None:
    task = app.tasks[TASK_FOR_STEP[step]]
    task.apply_async((ref, token), countdown=countdown if countdown > 0 else None)


def get_steps() -> Steps:
    """This process's Steps (a Redis client and HTTP session do not survive fork)."""
    steps = _steps.get(os.getpid())
    if steps is None:
        steps = build_steps(app.vidq_settings)
        _steps.clear()
        _steps[os.getpid()] = steps
    return steps


def build_steps(settings) -> Steps:
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    store = JobStore(client)
    return Steps(
        settings=settings, store=store,
        admission=Admission(store, settings.max_in_flight, settings.step_grace_s),
        client=UpstreamClient(settings), storage=open_storage(settings.storage_url),
        durations=DurationModel(client, settings.expected_generation_s), dispatch=dispatch,
    )


def run_step(step: str, ref: str, token: str) -> None:
    steps = get_steps()
    job = steps.claim(ref, token, step)
    if job is None:
        log.info("%s for %s: stale token %s, nothing to do", step, ref, token)
        return
    try:
        getattr(steps, step)(job)
    except ResultLinkExpired as exc:
        steps.refresh_link(job, exc)
    except (RetryableUpstreamError, CorruptVideo) as exc:
        steps.retry(job, exc)
    except PermanentUpstreamError as exc:
        steps.fail(job, f"{step}: {exc}")
    except (StorageError, OSError) as exc:
        # A full or unwritable disk: count it as an attempt so the job ends
        # failed (with its generation id) instead of being re-sent forever.
        steps.retry(job, exc)


def reconcile_once() -> None:
    steps = get_steps()
    settings = steps.settings
    lock_ms = int(settings.reconcile_interval_s * 900)
    if not steps.store.redis.set("vidq:reconcile:lock", "1", nx=True, px=lock_ms):
        return
    try:
        resent = reconcile(steps.admission, dispatch, time.time(), settings.grace_s)
        if resent:
            log.warning("reconciler re-sent %d lost steps", resent)
    except redis.RedisError as exc:
        log.warning("reconcile skipped: %s", exc)


@app.task(name=TASK_FOR_STEP["submit"])
def submit(ref: str, token: str) -> None:
    """POST the job upstream (once ever), then schedule its first poll."""
    run_step("submit", ref, token)


@app.task(name=TASK_FOR_STEP["poll"])
def poll(ref: str, token: str) -> None:
    """GET the generation's status; reschedule, download or fail."""
    run_step("poll", ref, token)


@app.task(name=TASK_FOR_STEP["download"])
def download(ref: str, token: str) -> None:
    """Stream the finished video into storage and write its sidecar."""
    run_step("download", ref, token)
