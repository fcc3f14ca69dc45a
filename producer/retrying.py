"""`vidq retry`: choose the failed jobs, confirm a new charge, say what happened.

A re-POST is a new generation and a new charge, so `--resubmit` (and
`--resubmit-unknown`) ask before doing anything. On a terminal the question is
asked; when standard input is not a terminal (a script, cron) there is nobody
to ask, so `--yes` is required and its absence is an error: nothing is
requeued, exit status 2.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import click

from worker import keys
from worker.admission import Admission
from worker.batch_changes import being_purged
from worker.batch_control import admission_state
from worker.errors import InputError
from worker.jobs import FINAL_STATES
from worker.metrics_record import failure_kind
from worker.retry import Failure, failures, retry, select


def plural(count: int, word: str = "job") -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def run_retry(admission: Admission, dispatch, batch: str, *, ids: Sequence[str] = (),
              reason: str = "", resubmit: bool = False, resubmit_unknown: bool = False,
              include_completed: bool = False, yes: bool = False,
              echo: Callable[[str], None] = click.echo) -> int:
    """Retry the chosen failures of `batch`; returns how many were requeued."""
    if include_completed and not resubmit:
        raise InputError("--include-completed goes with --resubmit")
    store = admission.store
    if store.batch_total(batch) == 0:
        raise InputError(f"no batch named {batch!r}")
    if admission.purging(batch):  # its records are going: what they say is not the batch
        raise InputError(being_purged(batch, "nothing retried"))
    cancelled = admission_state(admission, batch) == "cancelled"
    if cancelled and (resubmit or resubmit_unknown):
        raise InputError(f"batch {batch!r} was cancelled: its jobs are not POSTed again")
    _check_ids(admission, batch, ids)
    chosen = select(failures(store, batch), ids, reason)
    if cancelled:  # a paid generation is still polled and its video downloaded
        chosen = [failure for failure in chosen if failure.generation_id]
        if not chosen:
            raise InputError(f"batch {batch!r} was cancelled: only failed jobs with a "
                             "generation id are polled again, and it has none"
                             f"{_filters(ids, reason)}")
    if not chosen:
        echo(f"batch {batch}: no failed jobs{_filters(ids, reason)}; nothing to retry"
             + _still_running(store, batch))
        return 0
    charged = _charged(chosen, resubmit, resubmit_unknown, include_completed)
    if charged:
        _confirm(batch, charged, yes)
    finished = sum(1 for failure in chosen if failure.completed)
    if resubmit and finished and not include_completed:
        echo(f"{plural(finished)} not POSTed again: {'its' if finished == 1 else 'their'} "
             "generation finished upstream (paid for); polled again and downloaded "
             "(--include-completed buys new ones if those videos cannot be fetched)")
    unseen = sum(1 for failure in chosen if failure.generation_id and not failure.completed
                 and not _failed_upstream(failure))
    if resubmit and unseen:
        echo(f"{plural(unseen)} had a generation nobody saw finish: it is looked at again "
             "before the new POST, and if it finished meanwhile its video is downloaded "
             "and nothing is POSTed")
    result = retry(admission, dispatch, batch, chosen, resubmit=resubmit,
                   resubmit_unknown=resubmit_unknown, include_completed=include_completed)
    polled = result.requeued - result.resubmitted
    echo(f"batch {batch}: {plural(result.requeued, 'failed job')} requeued"
         + (f" ({result.resubmitted} to be POSTed again, {polled} polled again)"
            if result.resubmitted else ""))
    failed_upstream = 0 if resubmit else sum(1 for failure in chosen if _failed_upstream(failure))
    if failed_upstream:
        echo(f"{plural(failed_upstream)} failed upstream (the generation's own error): "
             f"polled again, {'it finds' if failed_upstream == 1 else 'they find'} the same "
             "error; --resubmit POSTs a new generation (charged)")
    if result.cancelled:
        echo(f"{plural(result.cancelled)} left failed: batch {batch!r} was cancelled "
             "meanwhile, and its jobs are not POSTed again")
    if result.purging:
        echo(f"{plural(result.purging)} left failed: batch {batch!r} began to be purged "
             "meanwhile (removed from Redis); nothing more was retried")
    if result.left_unknown:
        echo(f"{plural(result.left_unknown)} left failed: the outcome of "
             f"{'its' if result.left_unknown == 1 else 'their'} POST is unknown "
             "(it may have been charged); add --resubmit-unknown to POST again")
    return result.requeued


def _still_running(store, batch: str) -> str:
    """Said when jobs are still on their way: a `retry` then a `retry
    --resubmit` at once found the first's jobs polled again, not failed yet,
    and said only "nothing to retry" (review 124)."""
    running = sum(count for state, count in store.counts(batch).items()
                  if state not in FINAL_STATES)
    if not running:
        return ""
    return (f" now: {plural(running)} still running or polled again (an earlier retry's "
            "among them, say); those that fail can be retried once they end "
            f"(vidq status {batch} --watch)")


def plain_retry_helps(failure: Failure, cancelled: bool) -> bool:
    """Whether a plain `vidq retry` can still end `failure` done: a paid
    generation not failed upstream is polled (its video downloaded), and a
    job with nothing created is POSTed again, unless its batch was cancelled.
    Not an outcome-unknown POST: only --resubmit-unknown sends it again."""
    if failure.generation_id:
        return not _failed_upstream(failure)
    return not failure.outcome_unknown and not cancelled


def resubmit_unknown_helps(failure: Failure, cancelled: bool) -> bool:
    """Whether only --resubmit-unknown can still end `failure` done: its POST's
    outcome is unknown, no id came, and its batch was not cancelled."""
    return failure.outcome_unknown and not failure.generation_id and not cancelled


def _failed_upstream(failure: Failure) -> bool:
    """Its generation ended in the upstream's own error (`error`, `failed`)."""
    return (bool(failure.generation_id) and failure.reason.startswith("poll: ")
            and failure_kind("poll", failure.reason) == "generation_failed")


def _check_ids(admission: Admission, batch: str, ids: Sequence[str]) -> None:
    if not ids:
        return
    member = admission.redis.smismember(keys.batch_jobs(batch), list(ids))
    unknown = [job_id for job_id, known in zip(ids, member, strict=True) if not known]
    if unknown:
        raise InputError(f"--ids: {plural(len(unknown), 'id')} not in batch {batch!r}: "
                         + ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else ""))


def _charged(chosen: list[Failure], resubmit: bool, resubmit_unknown: bool,
             include_completed: bool = False) -> int:
    if resubmit:  # a finished generation is downloaded, not paid again unless asked
        return sum(1 for failure in chosen if include_completed or not failure.completed)
    return sum(1 for failure in chosen if failure.outcome_unknown) if resubmit_unknown else 0


def _confirm(batch: str, charged: int, yes: bool) -> None:
    cost = ("a new generation and a new charge" if charged == 1
            else "new generations, each a new charge")
    what = (f"{plural(charged)} of batch {batch} will be POSTed again: {cost} "
            "(old generation ids stay in each job's history)")
    if yes:
        click.echo(what, err=True)
        return
    if not sys.stdin.isatty():
        raise InputError(f"{what}; add --yes to confirm (standard input is not a terminal)")
    if not click.confirm(f"{what}. Continue?", default=False, err=True):
        raise InputError("nothing retried")


def _filters(ids: Sequence[str], reason: str) -> str:
    parts = []
    if ids:
        parts.append(f"among {plural(len(ids), 'id')} given")
    if reason:
        parts.append(f"with a reason containing {reason!r}")
    return (" " + " ".join(parts)) if parts else ""
