"""`vidq retry`: put a batch's failed jobs back in line, at a cost that grows
with the failures, not with the batch.

Every script that moves a job into or out of `failed` changes the batch's
failed set in the same call (`lua/transition.lua`, `lua/requeue.lua`,
`lua/record_generation.lua`); `lua/failed_jobs.lua` reads the set, and drops a
member whose job has left `failed` by a path that did not keep the set. A
batch enqueued before the set existed has failures the set does not know: when
the set holds fewer than the counts say, it is rebuilt once from the batch.

Without `resubmit` a job with a generation id is polled again (a late video is
downloaded, nothing is paid): it takes a slot at once, not a place in line,
since its generation runs upstream whatever the line says, and pauses, spend
caps and cancels are about new POSTs; a job whose POST has an unknown outcome stays
failed unless re-POSTing it was asked for. With `resubmit` every selected job
gets a new generation: its old id goes into its history and the admission
puts it back in line, in one call per job (`lua/requeue.lua`), so a cancel
between the two cannot leave a failed job stripped of its id.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import keys
from .admission import Admission, admit
from .jobs import JobStore, State, load_script

CHUNK = 5000


@dataclass(frozen=True)
class Failure:
    """One failed job, as `vidq retry` and `vidq status` see it."""

    job_id: str
    reason: str
    generation_id: str
    outcome_unknown: bool  # its POST may have been charged; no id to poll
    completed: bool = False  # its generation finished upstream: its video is paid for


@dataclass
class RetryResult:
    requeued: int = 0
    resubmitted: int = 0
    left_unknown: int = 0  # outcome unknown, --resubmit not given
    cancelled: int = 0  # not requeued: the batch was cancelled meanwhile
    purging: int = 0  # not requeued: the batch began to be purged meanwhile
    answers: dict[str, int] = field(default_factory=dict)


def failures(store: JobStore, batch: str) -> list[Failure]:
    """Every failed job of `batch`, sorted by id; O(failures) round trips."""
    found = _read_failed(store, batch)
    counted = int(store.redis.hget(keys.batch_counts(batch), State.FAILED) or 0)
    if len(found) < counted:
        rebuild_failed_set(store, batch)
        found = _read_failed(store, batch)
    return sorted(found, key=lambda failure: failure.job_id)


def _read_failed(store: JobStore, batch: str) -> list[Failure]:
    script = load_script(store.redis, "failed_jobs")
    answer = script(keys=[keys.batch_failed(batch)],
                    args=[keys.job(keys.job_ref(batch, ""))])
    return [Failure(job_id, reason, generation_id, bool(posting) and not generation_id
                    or unknown == "1", bool(generation_id and completed_at))
            for job_id, reason, generation_id, posting, unknown, completed_at
            in json.loads(answer)]


def rebuild_failed_set(store: JobStore, batch: str) -> int:
    """Fill the failed set from every job of the batch (once, for a batch
    older than the set); returns how many failed jobs it holds."""
    ids = store.job_ids(batch)
    failed: list[str] = []
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start:start + CHUNK]
        pipe = store.redis.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hget(keys.job(keys.job_ref(batch, job_id)), "state")
        failed += [job_id for job_id, state in zip(chunk, pipe.execute(), strict=True)
                   if state == State.FAILED]
    for start in range(0, len(failed), CHUNK):
        store.redis.sadd(keys.batch_failed(batch), *failed[start:start + CHUNK])
    return len(failed)


def select(found: list[Failure], ids: Iterable[str] = (), reason: str = "") -> list[Failure]:
    """The failures named by `ids` (all if none) whose reason contains `reason`
    (case-insensitive)."""
    wanted = set(ids)
    needle = reason.lower()
    return [failure for failure in found
            if (not wanted or failure.job_id in wanted) and needle in failure.reason.lower()]


def retry(admission: Admission, dispatch, batch: str, chosen: list[Failure], *,
          resubmit: bool = False, resubmit_unknown: bool = False,
          include_completed: bool = False) -> RetryResult:
    """Put `chosen` back in line (see the module docstring), then fill free slots."""
    answers = requeue(admission, dispatch, batch, [f.job_id for f in chosen],
                      resubmit_unknown=resubmit_unknown, resubmit=resubmit,
                      include_completed=include_completed)
    resubmitted = answers.get("resubmitted", 0)
    return RetryResult(requeued=answers.get("requeued", 0) + resubmitted,
                       resubmitted=resubmitted, left_unknown=answers.get("needs_resubmit", 0),
                       cancelled=answers.get("cancelled", 0),
                       purging=answers.get("purging", 0), answers=answers)


def requeue(admission: Admission, dispatch, batch: str, job_ids: list[str], *,
            resubmit_unknown: bool = False, resubmit: bool = False,
            include_completed: bool = False) -> dict[str, int]:
    """Failed jobs back in their line, then free slots filled; the answers of
    `Admission.requeue_failed`."""
    answers = admission.requeue_failed(batch, resubmit_unknown=resubmit_unknown,
                                       job_ids=job_ids, resubmit=resubmit,
                                       include_completed=include_completed)
    admit(admission, dispatch)
    return answers
