"""The body of `vidq run`: start the local system, enqueue, watch, summarise.

The state lives in `--state-dir` (default `.vidq`): running the same command
again resumes the batch (done jobs untouched, jobs in flight polled, nothing
POSTed twice).
"""
from __future__ import annotations

import contextlib
import shlex
import sys
import time
from pathlib import Path

import redis
from rich.console import Console

from worker import keys, manifest
from worker.batch_control import slot_holders
from worker.contract import DEFAULT_MODEL
from worker.errors import InputError, VidqError
from worker.jobs import State
from worker.retry import failures as failed_jobs
from worker.settings import Settings
from worker.storage import open_storage

from .batch_view import workers_alive
from .enqueue import enqueue_file, open_admission
from .local import RunOptions, local_system
from .progress import batch_status, ended_line, watch
from .prompts import load_prompts, same_request, shown_path
from .purging import write_manifest
from .retrying import plain_retry_helps, resubmit_unknown_helps, run_retry
from .stop_signals import (
    STOPPED_BY,
    catch_stop_signals,
    ignore_stop_signals,
    raise_if_stopped,
    stopped_status,
)


def run_batch(file: Path, batch: str, use_sandbox: bool, workers: int, concurrency: int,
              state_dir: Path, console: Console, allow_variants: bool = False,
              retry_failed: dict | None = None, named_by_file: bool = False) -> int:
    """Exit status: 0 only if every job of the batch ended done. `retry_failed`:
    put the batch's failures back in line first, with these `run_retry` options."""
    options = RunOptions(file, batch, use_sandbox, workers, concurrency, state_dir.resolve(),
                         named_by_file)
    # SIGTERM and SIGHUP stop the run as Ctrl-C does: its Redis and workers
    # run in sessions of their own, and outlived it.
    catch_stop_signals()
    defaults = {"model": DEFAULT_MODEL}
    load_prompts(file, defaults)  # refuse a bad file before starting anything
    # Redis and the workers run in their own sessions, so Ctrl-C reaches only
    # this process, which reports and then stops them in order.
    try:
        with local_system(options, console) as (env, supervisor):
            return _run_started(options, env, supervisor, defaults, console, allow_variants,
                                retry_failed)
    except KeyboardInterrupt:  # while starting: what had started is stopped (helper 108)
        interrupted(None, batch, console)
        return stopped_status()


def _run_started(options: RunOptions, env: dict, supervisor, defaults: dict, console: Console,
                 allow_variants: bool, retry_failed: dict | None) -> int:
    """Enqueue, watch and summarise, with the local system up."""
    import worker
    from worker.celery_app import apply_settings

    batch, admission = options.batch, None

    def keep_going() -> bool:
        raise_if_stopped()
        return supervisor.keep_alive()

    try:
        raise_if_stopped()
        settings = Settings.from_env(env)
        apply_settings(worker.app, settings)  # publish to this run's Redis
        admission = open_admission(settings)
        _take_in(admission, options, defaults, console, allow_variants, retry_failed)
        # Workers take a few seconds to start; "no worker is alive" is for
        # a night where they are really gone, not for these.
        _until_a_worker_beats(admission, keep_going)
        status = watch(admission, batch, console, settings=settings, keep_going=keep_going)
        # Watching is over: a stop signal now must not cut the summary,
        # the manifest or the stopping short (a finished batch read as failed).
        ignore_stop_signals()
        if not supervisor.keep_alive():
            console.print("[red]the workers keep exiting at start-up; see "
                          f"{options.state_dir / 'logs'}[/]")
        return summarise(admission, batch, status, settings, console)
    except KeyboardInterrupt:
        interrupted(admission, batch, console)
        return stopped_status()
    except OSError:
        if not STOPPED_BY:
            raise
        # The terminal closed (SIGHUP): the progress bars' last write failed
        # with EIO over the interrupt. Still a stop, its workers given their
        # time, not an error that kills them (review 137).
        interrupted(admission, batch, console)
        return stopped_status()
    except (redis.ConnectionError, redis.TimeoutError):
        why = supervisor.redis_stopped()
        if not why:
            raise
        # A full disk stops a Redis with appendfsync always: say so, not
        # "cannot use Redis (VIDQ_REDIS_URL)" five minutes later.
        console.print(f"[red]this run's Redis stopped ({why})[/]; once the cause is "
                      f"fixed (a full disk?), the state in {options.state_dir} is kept")
        interrupted(None, batch, console)
        return 2


def _take_in(admission, options: RunOptions, defaults: dict, console: Console,
             allow_variants: bool, retry_failed: dict | None) -> None:
    """Enqueue the file's new prompts, then with --retry put the batch's
    failures back in line, as `vidq retry BATCH` does (a paid id is polled,
    never re-POSTed). A cancelled batch takes no new job, but its paid
    generations are still polled and downloaded, as on any resume."""
    from worker.tasks import dispatch

    batch = options.batch
    if admission.cancelled(batch):
        console.print(f"batch {batch} was cancelled: nothing new enqueued; its generations "
                      "in flight are still polled and downloaded")
    else:
        if options.named_by_file:
            _refuse_another_files_batch(admission, batch, options.file, defaults)
        console.print(enqueue_file(admission, options.file, batch, defaults, dispatch,
                                   allow_variants=allow_variants).summary())
    if retry_failed is not None:
        run_retry(admission, dispatch, batch, echo=console.print, **retry_failed)


RETRY_FLAGS = ("--retry", "--resubmit-unknown", "--yes")
FILES_SAMPLED = 20


def _refuse_another_files_batch(admission, batch: str, file: Path, defaults: dict) -> None:
    """The name made of a file's stem is not the file's alone: `東京.txt`
    and `大阪.txt` both make `batch`, `night 1.txt` and `night-1.txt` both
    `night-1`. Run one after the other in a directory, the second joined the
    first's batch: its summary, exit status, manifest and --retry covered
    the other file's jobs (review 139). A rerun resumes: the batch holds
    exactly this file's prompts (renamed or moved), or some of the jobs
    looked at (this file's first ones, a sample of the batch's) came from a
    file of this name. Anything else is refused."""
    client = admission.redis
    sample = client.srandmember(keys.batch_jobs(batch), FILES_SAMPLED)
    if not sample:
        return
    jobs = load_prompts(file, defaults).jobs
    found = admission.existing_requests(batch, [job.job_id for job in jobs])
    already = sum(1 for job in jobs
                  if job.job_id in found and same_request(found[job.job_id], job.request))
    if jobs and already == len(jobs) == admission.store.batch_total(batch):
        # The same prompts and nothing else: the same file, renamed or moved
        # (review 144); not a file sharing some of another's (review 145).
        return
    own = [job.job_id for job in jobs[:FILES_SAMPLED]]
    pipe = client.pipeline(transaction=False)
    for job_id in [*own, *sample]:
        pipe.hget(keys.job(keys.job_ref(batch, job_id)), "file")
    files = {Path(str(name)).name for name in pipe.execute() if name}
    if files and shown_path(file.name) not in files:
        shared = (f"; {already} of its {len(jobs)} prompts are in it already (with "
                  f"--batch {batch} they are not bought again)" if already else "")
        raise InputError(f"batch {batch!r}, the name made of {shown_path(file.name)!r}, holds "
                         f"the prompts of {sorted(files)[0]!r}: give this file's batch a name "
                         f"with --batch NAME (nothing was enqueued){shared}")


def _until_a_worker_beats(admission, keep_going, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (time.monotonic() < deadline and keep_going()
           and not workers_alive(admission.redis)):
        time.sleep(0.2)


def interrupted(admission, batch: str, console: Console) -> None:
    """What was in flight when Ctrl-C came, and how to go on."""
    if admission is not None:
        try:
            status = batch_status(admission, batch)
            counts = status["counts"]
            in_flight = sum(counts[s] for s in ("submitted", "generating", "overdue",
                                                "downloading"))
            # Admitted, not yet known as submitted: its POST may be on its way,
            # its generation created (review 135 saw it called "not submitted").
            posting = min(slot_holders(admission, batch)[State.QUEUED], counts["queued"])
            console.print(f"\ninterrupted: {status['finished']}/{status['total']} finished, "
                          f"{in_flight} in flight upstream or downloading "
                          "(paid; taken up on resume), "
                          + (f"{posting} being POSTed (may be charged), " if posting else "")
                          + f"{counts['queued'] - posting} not submitted yet")
        except Exception:  # Redis may already be gone (or the terminal); the hint below still holds
            pass
    with contextlib.suppress(OSError):  # a closed terminal: the stop must go on (review 137)
        console.print(f"resume with: {_same_command()}")


def _same_command(*flags: str) -> str:
    """This run's command line (`vidq run ...`) with `flags` put before the
    other arguments (a file after `--` is taken as it is), and without its
    retry flags otherwise: the failures were requeued once."""
    command, *args = sys.argv[1:]
    args = [*flags, *(arg for arg in args if arg not in RETRY_FLAGS)]
    return " ".join(shlex.quote(arg) for arg in ["vidq", command, *args])


def summarise(admission, batch: str, status: dict, settings: Settings,
              console: Console) -> int:
    counts = status["counts"]
    console.print(f"[bold]{batch}[/]: {ended_line(status)}")
    if counts["done"]:
        console.print(f"videos in {settings.storage_url.removeprefix('file://')}/{batch}/")
    failed = failed_jobs(admission.store, batch)
    for failure in failed[:20]:
        console.print(f"  failed {failure.job_id}: {failure.reason}")
    cancelled = admission.cancelled(batch)
    # `vidq retry` needs this run's Redis, which stops with it.
    if any(plain_retry_helps(failure, cancelled) for failure in failed):
        console.print(f"retry them with: {_same_command('--retry')}")
    if any(resubmit_unknown_helps(failure, cancelled) for failure in failed):
        console.print("POST again those whose POST's outcome is unknown (each may have been "
                      "charged already) with: "
                      f"{_same_command('--retry', '--resubmit-unknown', '--yes')}")
    # This run's Redis stops with it: the manifest is what stays to read.
    storage = open_storage(settings.storage_url, settings.s3_part_bytes)
    try:
        write_manifest(admission.redis, storage, settings, batch)
        # Not for a batch left unfinished (the workers kept exiting): no manifest
        # is written for it, and an older one would describe another run.
        if manifest.read_marks(admission.redis, [batch])[batch].manifest_current:
            console.print(f"every job's row: {storage.location(manifest.manifest_key(batch))} "
                          "(failed ones also in errors.jsonl beside it)")
    except (VidqError, redis.RedisError, OSError) as exc:
        console.print(f"[yellow]manifest not written: {exc}[/]")
    return 0 if counts["done"] == status["total"] else 1
