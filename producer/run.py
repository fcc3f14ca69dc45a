"""The body of `vidq run`: start the local system, enqueue, watch, summarise."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

from worker.contract import DEFAULT_MODEL
from worker.settings import Settings

from .enqueue import enqueue_file, open_admission
from .local import RunOptions, local_system
from .progress import failures, watch
from .prompts import load_prompts


def run_batch(file: Path, batch: str, use_sandbox: bool, workers: int, concurrency: int,
              state_dir: Path, console: Console) -> int:
    """Exit status: 0 only if every job of the batch ended done."""
    import worker
    from worker.celery_app import apply_settings
    from worker.tasks import dispatch

    options = RunOptions(file, batch, use_sandbox, workers, concurrency, state_dir.resolve())
    defaults = {"model": DEFAULT_MODEL}
    load_prompts(file, defaults)  # refuse a bad file before starting anything
    with local_system(options, console) as (env, alive):
        settings = Settings.from_env(env)
        apply_settings(worker.app, settings)  # publish to this run's Redis
        admission = open_admission(settings)
        result = enqueue_file(admission, file, batch, defaults, dispatch)
        console.print(f"batch {batch}: {result.jobs_in_file} jobs "
                      f"({result.created} new, {result.already_there} already enqueued)")
        status = watch(admission, batch, console, keep_going=alive)
        if not alive():
            console.print("[red]every worker process has exited; see the logs above[/]")
        return summarise(admission, batch, status, settings, console)


def summarise(admission, batch: str, status: dict, settings: Settings,
              console: Console) -> int:
    counts = status["counts"]
    console.print(f"[bold]{batch}[/]: {counts['done']} done, {counts['failed']} failed "
                  f"of {status['total']}")
    console.print(f"videos in {settings.storage_url.removeprefix('file://')}/{batch}/")
    for job_id, reason in failures(admission.store, batch):
        console.print(f"  failed {job_id}: {reason}")
    return 0 if counts["done"] == status["total"] else 1
