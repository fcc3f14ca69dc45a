"""The `vidq` command: enqueue, status, run, sandbox."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import click
from rich.console import Console

from worker.contract import ASPECT_RATIOS, DEFAULT_MODEL, RESOLUTIONS
from worker.errors import VidqError
from worker.settings import Settings

console = Console(stderr=False, highlight=False)


def _fail(error: Exception) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(2)


class VidqCommand(click.Command):
    """Turns every VidqError, and an unreachable Redis, into one clear line
    and exit status 2, never a traceback."""

    def invoke(self, ctx):
        import redis

        try:
            return super().invoke(ctx)
        except VidqError as exc:
            _fail(exc)
        except redis.RedisError as exc:
            _fail(RuntimeError(f"cannot use Redis (VIDQ_REDIS_URL): {type(exc).__name__}: "
                               f"{exc}"))


@click.group()
def main() -> None:
    """Overnight text-to-video batches on Celery + Redis."""


def _prompt_defaults(model, resolution, aspect_ratio, negative_prompt, seed, no_enhance):
    defaults = {"model": model}
    for name, value in (("resolution", resolution), ("aspect_ratio", aspect_ratio),
                        ("negative_prompt", negative_prompt), ("seed", seed)):
        if value is not None:
            defaults[name] = value
    if no_enhance:
        defaults["enhance_prompt"] = False
    return defaults


@main.command(cls=VidqCommand)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--batch", required=True, help="Batch name: letters, digits, . _ -")
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--resolution", type=click.Choice(RESOLUTIONS))
@click.option("--aspect-ratio", type=click.Choice(ASPECT_RATIOS))
@click.option("--negative-prompt")
@click.option("--seed", type=int)
@click.option("--no-enhance-prompt", is_flag=True, help="Turn prompt expansion off.")
@click.option("--priority", type=click.Choice(["high", "normal", "low"]),
              help="The batch's admission priority (new batches: normal).")
@click.option("--max-credits", type=click.FloatRange(min=0),
              help="Admit no job that could carry the batch's credits past this.")
@click.option("--max-videos", type=click.IntRange(min=0),
              help="Admit at most this many of the batch's videos.")
def enqueue(file, batch, model, resolution, aspect_ratio, negative_prompt, seed,
            no_enhance_prompt, priority, max_credits, max_videos):
    """Validate FILE (.txt, .jsonl, .csv) and add its prompts to a batch."""
    from worker.tasks import dispatch

    from .enqueue import enqueue_file, open_admission

    defaults = _prompt_defaults(model, resolution, aspect_ratio, negative_prompt, seed,
                                no_enhance_prompt)
    admission = open_admission(Settings.from_env())
    batch_settings = {name: value for name, value in (
        ("priority", priority), ("max_credits", max_credits), ("max_videos", max_videos))
        if value is not None}
    result = enqueue_file(admission, file, batch, defaults, dispatch, batch_settings)
    click.echo(f"batch {result.batch}: {result.jobs_in_file} jobs "
               f"({result.created} new, {result.already_there} already enqueued)")


@main.command(cls=VidqCommand)
@click.argument("batch")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--watch", is_flag=True, help="A live progress bar until the batch ends.")
def status(batch, as_json, watch):
    """Counts by state for BATCH."""
    from .enqueue import open_admission
    from .progress import batch_status, describe
    from .progress import watch as watch_batch

    admission = open_admission(Settings.from_env())
    result = batch_status(admission, batch)
    if result["total"] == 0:
        raise click.ClickException(f"no batch named {batch!r}")
    if watch:
        result = watch_batch(admission, batch, console)
    if as_json:
        click.echo(json.dumps(result))
    elif not watch:
        click.echo(f"{batch}: {result['finished']}/{result['total']} finished; {describe(result)}")


@main.command(cls=VidqCommand)
@click.argument("batch")
@click.option("--resubmit-unknown", is_flag=True,
              help="Also POST again jobs whose first POST has an unknown outcome "
                   "(they may have been charged already).")
def retry(batch, resubmit_unknown):
    """Put BATCH's failed jobs back in line (a paid generation is polled, not re-posted)."""
    from worker.admission import admit
    from worker.tasks import dispatch

    from .enqueue import open_admission

    admission = open_admission(Settings.from_env())
    if admission.store.batch_total(batch) == 0:
        raise click.ClickException(f"no batch named {batch!r}")
    answers = admission.requeue_failed(batch, resubmit_unknown=resubmit_unknown)
    admit(admission, dispatch)
    requeued = answers.get("requeued", 0)
    click.echo(f"batch {batch}: {requeued} failed {_jobs(requeued)} requeued")
    unknown = answers.get("needs_resubmit", 0)
    if unknown:
        click.echo(f"{unknown} {_jobs(unknown)} left failed: the outcome of their POST is "
                   "unknown (they may have been charged); add --resubmit-unknown to POST "
                   "them again")


def _jobs(count: int) -> str:
    return "job" if count == 1 else "jobs"


@main.command(cls=VidqCommand)
@click.argument("max_in_flight", required=False, type=click.IntRange(min=1))
def cap(max_in_flight):
    """Show or set C, the generations in flight upstream for the whole deployment."""
    from .enqueue import open_admission

    admission = open_admission(Settings.from_env())
    if max_in_flight is None:
        current = admission.cap()
        click.echo(f"C = {current}" if current else "C is not set yet (no worker has started)")
        return
    old = admission.set_cap(max_in_flight)
    click.echo(f"C = {max_in_flight} (was {old}); applies to the next admission")


@main.command(cls=VidqCommand)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--batch", help="Batch name (default: the file's name).")
@click.option("--sandbox", "use_sandbox", is_flag=True,
              help="Run against the local sandbox upstream: no credits spent.")
@click.option("--workers", default=1, show_default=True, help="Worker processes.")
@click.option("--concurrency", default=4, show_default=True, help="Pool size per worker.")
@click.option("--state-dir", default=".vidq", show_default=True, type=click.Path(path_type=Path))
def run(file, batch, use_sandbox, workers, concurrency, state_dir):
    """Run one batch end to end on this machine, then exit."""
    from worker.connection import connect

    from .run import run_batch

    # Refuse bad settings, and a given Redis that is malformed or unreachable,
    # before starting a private Redis, the sandbox or any worker.
    settings = Settings.from_env()
    if os.environ.get("VIDQ_REDIS_URL"):
        connect(settings.redis_url).ping()
    # The name becomes a path part and a key part: never a leading '.' or '-'.
    batch = batch or re.sub(r"[^A-Za-z0-9._-]", "-", file.stem).lstrip(".-")[:128] or "batch"
    sys.exit(run_batch(file, batch, use_sandbox, workers, concurrency, state_dir, console))


@main.command(name="sandbox", cls=VidqCommand)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8900, show_default=True)
@click.option("--time-scale", default=1.0, show_default=True,
              help="Divide generation times by this.")
@click.option("--max-concurrency", default=2, show_default=True,
              help="Generations in flight before 429.")
@click.option("--api-key", default="sandbox-key", show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Where rendered videos are cached (default ~/.cache/vidq-sandbox).")
def sandbox_command(host, port, time_scale, max_concurrency, api_key, cache_dir):
    """Run the local stand-in for the upstream API."""
    from sandbox import SandboxConfig
    from sandbox.server import serve_forever

    serve_forever(SandboxConfig(host=host, port=port, time_scale=time_scale,
                                max_concurrency=max_concurrency, api_key=api_key,
                                cache_dir=cache_dir))


@main.command(cls=VidqCommand)
@click.argument("batch")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl",
              show_default=True)
@click.option("--state", "states", multiple=True, metavar="STATE",
              help="Only jobs in this state (queued, submitted, generating, overdue, "
                   "downloading, done, failed); may be repeated.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to FILE (published whole) instead of standard output.")
def report(batch, fmt, states, output):
    """One row per job of BATCH: id, input line, prompt, parameters, state,
    storage URL, sha256, generation ids, credits, timings, error."""
    from .enqueue import open_admission
    from .report import check_states, report_rows, write_csv, write_jsonl

    chosen = check_states(states)
    settings = Settings.from_env()
    admission = open_admission(settings)
    rows = report_rows(admission.store, batch, settings.storage_url, chosen)
    write = write_csv if fmt == "csv" else write_jsonl
    if output is None:
        try:
            write(rows, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:  # `vidq report ... | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    partial = output.with_name(f".{output.name}.part")
    try:
        with open(partial, "w", encoding="utf-8", newline="") as out:
            count = write(rows, out)
        os.replace(partial, output)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise VidqError(f"cannot write {output}: {exc.strerror or exc}") from None
        raise
    click.echo(f"batch {batch}: {count} {_jobs(count)} written to {output}", err=True)


# pause, resume, cancel and limits live in their own module; importing it
# registers them on `main` (it imports `main` from here, hence the end).
from . import control  # noqa: E402,F401
