"""Enqueue a prompt file into a batch: validate everything, then write.

Nothing is written unless the whole file is good and agrees with the jobs the
batch already has. Jobs wait in the admission list; only as many submit tasks
as there are free upstream slots are published now (the workers publish the
rest as slots free up).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from worker.admission import Admission
from worker.errors import InputError
from worker.jobs import JobStore

from .prompts import ID_PATTERN, LineError, PromptFileError, load_prompts


@dataclass(frozen=True)
class EnqueueResult:
    batch: str
    jobs_in_file: int
    created: int
    already_there: int
    merged_duplicates: int


def check_batch_name(batch: str) -> str:
    if not ID_PATTERN.fullmatch(batch):
        raise InputError(
            f"batch name {batch!r}: use 1-128 characters of letters, digits, '.', '_' or '-'")
    return batch


def enqueue_file(admission: Admission, path: str | Path, batch: str, defaults: dict,
                 dispatch) -> EnqueueResult:
    check_batch_name(batch)
    prompt_file = load_prompts(path, defaults)
    jobs = [(job.job_id, job.request) for job in prompt_file.jobs]
    existing = admission.existing_requests(batch, [job_id for job_id, _ in jobs])
    conflicts = [
        LineError(job.line, "id", f"job {job.job_id!r} already exists in batch {batch!r} "
                                  "with different parameters")
        for job in prompt_file.jobs
        if job.job_id in existing and existing[job.job_id] != job.request
    ]
    if conflicts:
        raise PromptFileError(str(path), conflicts)
    created = admission.enqueue(batch, (j for j in jobs if j[0] not in existing), time.time())
    for ref, token in admission.pump(time.time()):
        dispatch("submit", ref, token, 0.0)
    return EnqueueResult(batch, len(jobs), created, len(existing),
                         prompt_file.merged_duplicates)


def open_admission(settings) -> Admission:
    import redis

    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    return Admission(JobStore(client), settings.max_in_flight, settings.step_grace_s)
