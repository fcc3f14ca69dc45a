"""Enqueue a prompt file into a batch: validate everything, then write.

Nothing is written unless the whole file is good and agrees with the jobs the
batch already has. Jobs wait in the admission list; only as many submit tasks
as there are free upstream slots are published now (the workers publish the
rest as slots free up).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from worker import keys
from worker.admission import Admission, admit
from worker.batch_changes import EnqueueInterrupted
from worker.connection import connect
from worker.errors import InputError
from worker.jobs import JobStore
from worker.leases import BATCH_LOCK_S, Fence, held_lock
from worker.spend import CreditEstimates

from .prompts import (
    ID_PATTERN,
    LineError,
    PromptFileError,
    case_twin,
    load_prompts,
    same_request,
    shown_path,
)
from .variants import check_variants


@dataclass(frozen=True)
class EnqueueResult:
    batch: str
    jobs_in_file: int
    created: int
    already_there: int
    merged_duplicates: int
    variants: int = 0  # new jobs differing from the batch's only by parameters

    def summary(self) -> str:
        """One line for the user: how many jobs, and where a count may surprise."""
        # Thousands separated, as `vidq plan` and `status` print them.
        jobs = f"{self.jobs_in_file:,} job" + ("" if self.jobs_in_file == 1 else "s")
        parts = [f"{self.created:,} new", f"{self.already_there:,} already enqueued"]
        if self.merged_duplicates:
            parts.append(f"{self.merged_duplicates} duplicate line(s) merged into one job each")
        if self.variants:
            parts.append(f"{self.variants} of the new ones variants of existing prompts")
        return f"batch {self.batch}: {jobs} ({', '.join(parts)})"


def check_batch_name(batch: str) -> str:
    """Return `batch` if it is safe as a path part and Redis key part, else raise InputError."""
    if isinstance(batch, str) and ID_PATTERN.fullmatch(batch):
        return batch
    from .prompts import id_problem, shown

    if isinstance(batch, str) and id_problem(batch) == "must not start with '.' or '-'":
        raise InputError(f"batch name {shown(batch)} must not start with '.' or '-'")
    name = shown(batch) if isinstance(batch, str) else repr(batch)
    raise InputError(f"batch name {name}: use 1-128 characters of letters, digits, "
                     "'.', '_' or '-', not starting with '.' or '-'")


def enqueue_file(admission: Admission, path: str | Path, batch: str, defaults: dict,
                 dispatch, batch_settings: dict | None = None,
                 allow_variants: bool = False, check_plan=None,
                 echo: Callable[[str], None] | None = None) -> EnqueueResult:
    """`batch_settings`: priority, max_credits, max_videos (see Admission.configure).
    New jobs that differ from the batch's only by parameters are refused
    unless `allow_variants` (producer/variants.py). `echo` says why it waits,
    when another enqueue of the batch holds it."""
    check_batch_name(batch)
    prompt_file = load_prompts(path, defaults)
    path = shown_path(path)
    jobs = [(job.job_id, job.request, {"line": job.line, "file": path})
            for job in prompt_file.jobs]
    # Checks and writes of two producers on one batch must not interleave:
    # both would find no variant and conflict, and every prompt be paid twice.
    def waiting(left_s: float) -> None:
        if echo is not None:
            echo(f"waiting for another enqueue of batch {batch!r} to end (or, if it was "
                 f"stopped, for its lock to lapse: up to {left_s:.0f} s)")

    with held_lock(admission.redis, keys.batch_enqueue_lock(batch), BATCH_LOCK_S,
                   waiting) as fence:
        assert fence is not None  # patient: it waits for the lock
        result = _checked_enqueue(admission, path, batch, prompt_file, jobs, batch_settings,
                                  allow_variants, check_plan, fence)
    admit(admission, dispatch)
    return result


def interrupted_enqueue(batch: str, stop: KeyboardInterrupt) -> str:
    """What an enqueue stopped by a signal left behind: jobs it wrote run
    (and are paid for), so enqueuing the file again under another name
    would buy them twice."""
    again = "the same command again enqueues the rest (nothing twice)"
    if isinstance(stop, EnqueueInterrupted):
        return (f"at least {stop.created} new jobs had been written to batch {batch!r} and "
                f"will run (`vidq cancel {batch}` stops those not yet admitted); {again}")
    return (f"the enqueue may not have written every job of batch {batch!r}; "
            f"`vidq status {batch}` shows what the batch holds, and {again}")


def _checked_enqueue(admission: Admission, path: str | Path, batch: str, prompt_file, jobs,
                     batch_settings, allow_variants: bool, check_plan,
                     fence: Fence) -> EnqueueResult:
    admission.refuse_if_cancelled(batch)  # before the plan is printed
    _refuse_case_twin_batch(admission.redis, batch)
    existing = admission.existing_requests(batch, [job[0] for job in jobs])
    conflicts = [
        LineError(job.line, "id", f"job {job.job_id!r} already exists in batch {batch!r} "
                                  "with different parameters")
        for job in prompt_file.jobs
        if job.job_id in existing and not same_request(existing[job.job_id], job.request)
    ]
    conflicts += _case_twins(admission.redis, batch, [job for job in prompt_file.jobs
                                                     if job.job_id not in existing])
    if conflicts:
        raise PromptFileError(str(path), conflicts)
    fresh = [job for job in prompt_file.jobs if job.job_id not in existing]
    variants = check_variants(admission.redis, batch, str(path), [job.request for job in fresh],
                              allow_variants, file_requests=[j[1] for j in jobs],
                              named=[job.named for job in fresh])
    # Asked already under another digest id (a default spelled out one way and
    # not the other): the same generation, not bought twice. (A line with its
    # own id is the user's take: created, as before.)
    known = set(existing) | {fresh[at].job_id for at in variants.already}
    if check_plan is not None:  # may refuse: nothing is enqueued yet
        check_plan([j[1] for j in jobs if j[0] not in known])
    created = admission.enqueue(batch, (j for j in jobs if j[0] not in known), time.time(),
                                batch_settings, fence)
    return EnqueueResult(batch, len(jobs), created, len(known),
                         prompt_file.merged_duplicates, variants.count)


def _refuse_case_twin_batch(client, batch: str) -> None:
    """A new batch named as another but for case would share its directory,
    and overwrite its manifest, on a case-insensitive disk (review 114)."""
    if client.sismember(keys.BATCHES, batch):
        return
    for other in client.sscan_iter(keys.BATCHES, count=1000):
        if str(other).lower() == batch.lower():
            raise InputError(f"batch name {batch!r} differs only in case from batch {other!r}: "
                             "on a case-insensitive disk (macOS, Windows) both would be one "
                             "directory (nothing was enqueued)")


def _case_twins(client, batch: str, new_jobs: list) -> list[LineError]:
    """New ids that differ only in case from one already in the batch: one
    video file on a case-insensitive disk (the file's own are checked by
    `load_prompts`). One pass over the batch's ids, only when there are new jobs."""
    if not new_jobs:
        return []
    folded: dict[str, str] = {}
    for job_id in client.sscan_iter(keys.batch_jobs(batch), count=5000):
        folded.setdefault(str(job_id).lower(), str(job_id))
    return [LineError(job.line, "id", case_twin(job.job_id, folded[job.job_id.lower()],
                                                f", already in batch {batch!r}"))
            for job in new_jobs if job.job_id.lower() in folded]


def open_admission(settings) -> Admission:
    return Admission(JobStore(connect(settings.redis_url)), settings.step_grace_s,
                     CreditEstimates.from_settings(settings), settings.deadline_s,
                     settings.hard_limit_s)
