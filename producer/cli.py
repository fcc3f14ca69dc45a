"""The `vidq` command: enqueue, status, run, sandbox."""
from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

import click
from rich.console import Console

from worker import keys
from worker.contract import ASPECT_RATIOS, DEFAULT_MODEL, MODELS, RESOLUTIONS
from worker.errors import ConfigError, InputError, VidqError
from worker.settings import Settings
from worker.webhook_signing import check_webhook_url

from .params import Limit


class OutputOptionalConsole(Console):
    """A reader that goes away (`nohup vidq run f | tee log`, the terminal
    closed: tee dies with it) must not end the command: rich's default exits 1
    at the next line, which stopped a night's `vidq run` and its workers."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


# soft_wrap: a path or message piped to a log stays on one line, whole for grep.
console = OutputOptionalConsole(stderr=False, highlight=False, soft_wrap=True)


def _fail(error: Exception) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(2)


class VidqCommand(click.Command):
    """Turns every VidqError, and an unreachable Redis, into one clear line
    and exit status 2, never a traceback. Reads the settings, refusing bad
    ones, before the command imports Celery and the rest: the error line then
    comes in a fraction of the time."""

    reads_settings = True

    def invoke(self, ctx):
        import redis

        try:
            if self.reads_settings:
                cli_settings()
            return super().invoke(ctx)
        except VidqError as exc:
            _fail(exc)
        except redis.RedisError as exc:
            from .redis_unusable import redis_error_text

            _fail(RuntimeError(redis_error_text(exc)))


class OwnSettingsCommand(VidqCommand):
    """`vidq run` (which reads the settings itself, for a Redis of its own)
    and `vidq sandbox` (which needs none)."""

    reads_settings = False


RUN_STATE_DIR = Path(".vidq")  # `vidq run`'s default --state-dir


@functools.cache
def cli_settings() -> Settings:
    """The settings from the environment. With VIDQ_REDIS_URL unset and a
    `vidq run` going on in this directory's .vidq, its Redis: `vidq status`
    in a second shell then reads the batch that run is running, not the
    default Redis, where it is not."""
    if os.environ.get("VIDQ_REDIS_URL", "").strip():
        return Settings.from_env()
    from .redis_server import running_url

    url = running_url(RUN_STATE_DIR / "redis")
    if url is None:
        return Settings.from_env()
    click.echo(f"VIDQ_REDIS_URL is unset: using the Redis of the `vidq run` in "
               f"{RUN_STATE_DIR.resolve()} ({url})", err=True)
    # Set, not only passed: the Celery app reads it when it first sends a task,
    # and sent `vidq enqueue`'s tasks to the default Redis (its jobs waited a
    # step grace for the run's workers to send them again).
    os.environ["VIDQ_REDIS_URL"] = url
    return Settings.from_env()


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


def _prompt_options(command):
    """The options that fill in a prompt file's defaults (enqueue, plan)."""
    for option in reversed([
            click.argument("file", type=click.Path(dir_okay=False, path_type=Path)),
            click.option("--model", type=click.Choice(MODELS), default=DEFAULT_MODEL,
                         show_default=True),
            click.option("--resolution", type=click.Choice(RESOLUTIONS)),
            click.option("--aspect-ratio", type=click.Choice(ASPECT_RATIOS)),
            click.option("--negative-prompt"),
            click.option("--seed", type=int),
            click.option("--no-enhance-prompt", is_flag=True,
                         help="Turn prompt expansion off.")]):
        command = option(command)
    return command


_deadline_option = click.option(
    "--deadline", metavar="DURATION",
    help="Say what C the batch needs to finish within this (e.g. 8h, 90m, 2d).")


@main.command(cls=VidqCommand)
@_prompt_options
@click.option("--batch", required=True, help="Batch name: letters, digits, . _ -")
@_deadline_option
@click.option("--force", is_flag=True, help="Enqueue even if --deadline cannot be met.")
@click.option("--priority", type=click.Choice(["high", "normal", "low"]),
              help="The batch's admission priority (new batches: normal).")
@click.option("--max-credits", type=Limit(removable=False),
              help="Admit no job that could carry the batch's credits past this.")
@click.option("--max-videos", type=Limit(whole=True, removable=False),
              help="Admit at most this many of the batch's videos.")
@click.option("--allow-variants", is_flag=True,
              help="Enqueue new jobs even if they differ from the batch's jobs only by "
                   "parameters (each is a new generation).")
@click.option("--webhook", metavar="URL",
              help="Also POST this batch's events to URL (signed with the workers' "
                   "VIDQ_WEBHOOK_SECRET).")
def enqueue(file, batch, model, resolution, aspect_ratio, negative_prompt, seed,
            no_enhance_prompt, deadline, force, priority, max_credits, max_videos,
            allow_variants, webhook):
    """Validate FILE (.txt, .jsonl, .csv) and add its prompts to a batch, saying first
    what the batch will take (see `vidq plan`)."""
    from worker.batch_control import daily_cap_reached
    from worker.deployment import check_webhook_deliverers, running_values
    from worker.tasks import dispatch

    from .enqueue import enqueue_file, interrupted_enqueue, open_admission
    from .plan import plan_check
    from .stop_signals import catch_stop_signals, stopped_status

    defaults = _prompt_defaults(model, resolution, aspect_ratio, negative_prompt, seed,
                                no_enhance_prompt)
    settings = cli_settings()
    admission = open_admission(settings)
    webhook_url = webhook and check_webhook_url(webhook, "--webhook")
    if webhook_url and (warning := check_webhook_deliverers(running_values(admission.redis),
                                                            "--webhook")):
        click.echo(warning, err=True)
    batch_settings = {name: value for name, value in (
        ("priority", priority), ("max_credits", max_credits), ("max_videos", max_videos),
        ("webhook_url", webhook_url)) if value is not None}
    catch_stop_signals()  # SIGTERM and SIGHUP too: say what was left to run
    result = None
    try:
        result = enqueue_file(admission, file, batch, defaults, dispatch, batch_settings,
                              allow_variants=allow_variants,
                              check_plan=plan_check(admission.redis, settings, deadline,
                                                    force, click.echo, max_credits),
                              echo=lambda text: click.echo(text, err=True))
        click.echo(result.summary())
        if admission.waiting(batch) and daily_cap_reached(admission):
            click.echo("warning: today's (UTC) daily credit cap is reached: the batch waits "
                       "until 00:00 UTC, or until `vidq limits --daily-credits` raises the cap",
                       err=True)
    except KeyboardInterrupt as stop:
        said = (f"after the enqueue ended ({result.summary()})" if result is not None
                else interrupted_enqueue(batch, stop))
        click.echo(f"interrupted: {said}", err=True)
        sys.exit(stopped_status())


@main.command(cls=VidqCommand)
@click.argument("batch")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--watch", is_flag=True,
              help="Follow the batch until every job has ended: a bar per state, rate, ETA "
                   "and warnings; exit status 1 if any job failed.")
@click.option("--every", "every_s", default=30.0, show_default=True, metavar="SECONDS",
              type=click.FloatRange(min=1), help="With --watch and output that is not a "
                                                 "terminal: one progress line this often.")
def status(batch, as_json, watch, every_s):
    """BATCH's counts by state, in flight and waiting (and the deployment's),
    failures by reason, credits, rate and ETA."""
    from .enqueue import open_admission
    from .redis_unusable import redis_gone
    from .status_cmd import show_from_manifest, show_status

    settings = cli_settings()
    admission = open_admission(settings)
    if redis_gone(admission.redis, settings, batch):
        sys.exit(show_from_manifest(settings, batch, as_json, watch))
    sys.exit(show_status(admission, settings, batch, console, as_json=as_json, follow=watch,
                         every_s=every_s))


@main.command(cls=VidqCommand)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
def batches(as_json):
    """Every batch in Redis: counts, age, rate and ETA."""
    from .enqueue import open_admission
    from .status_cmd import show_batches

    settings = cli_settings()
    show_batches(open_admission(settings), settings, as_json)


@main.command(cls=VidqCommand)
@click.argument("batch")
@click.option("--ids", "ids", multiple=True, metavar="ID",
              help="Only these failed jobs (repeatable; several ids may share one value, "
                   "separated by spaces or commas).")
@click.option("--reason", default="", metavar="TEXT",
              help="Only failed jobs whose reason contains TEXT (case-insensitive).")
@click.option("--resubmit", is_flag=True,
              help="POST a new generation for every chosen job: a new charge. Old "
                   "generation ids stay in the job's history. Not a job whose generation "
                   "finished upstream (paid for): it is polled and downloaded again.")
@click.option("--include-completed", is_flag=True,
              help="With --resubmit: buy a new generation for those too, when their "
                   "videos cannot be fetched (a link refused for good, a corrupt video).")
@click.option("--resubmit-unknown", is_flag=True,
              help="POST again only jobs whose POST has an unknown outcome (they may have "
                   "been charged already); the others are polled again.")
@click.option("--yes", is_flag=True,
              help="Confirm a new charge without asking (required when stdin is not a "
                   "terminal).")
def retry(batch, ids, reason, resubmit, include_completed, resubmit_unknown, yes):
    """Put BATCH's failed jobs back in line. Without --resubmit a job that has a
    generation id is polled again (a late video is downloaded), never re-posted."""
    from worker.tasks import dispatch

    from .enqueue import open_admission
    from .retrying import run_retry

    admission = open_admission(cli_settings())
    chosen = [part for value in ids for part in re.split(r"[\s,]+", value) if part]
    run_retry(admission, dispatch, batch, ids=chosen, reason=reason, resubmit=resubmit,
              include_completed=include_completed, resubmit_unknown=resubmit_unknown, yes=yes)


def _jobs(count: int) -> str:
    return "job" if count == 1 else "jobs"


@main.command(cls=VidqCommand)
@click.argument("batch")
@click.option("--force", is_flag=True,
              help="Remove an unfinished batch too (its waiting jobs are never submitted, "
                   "its generations in flight never downloaded; their slots stay taken "
                   "until they can no longer be running, so C still holds).")
def purge(batch, force):
    """Remove BATCH from Redis now (a finished batch expires after VIDQ_RETENTION_S
    anyway); its videos, sidecars and manifest stay in storage."""
    from .enqueue import open_admission
    from .purging import run_purge

    settings = cli_settings()
    run_purge(open_admission(settings), settings, batch, force=force)


@main.command(cls=VidqCommand)
@click.argument("max_in_flight", required=False, type=click.IntRange(min=1))
def cap(max_in_flight):
    """Show or set C, the generations in flight upstream for the whole deployment."""
    from .enqueue import open_admission

    admission = open_admission(cli_settings())
    if max_in_flight is None:
        current = admission.cap()
        set_by, deployed = (str(value or "") for value in admission.redis.hmget(
            keys.CONFIG, "cap_set_by", "deployment_cap"))
        by_operator = (f" (set with `vidq cap`; the workers' VIDQ_MAX_IN_FLIGHT is {deployed})"
                       if set_by == "operator" and deployed else "")
        lowered = admission.effective_cap()
        lowered_note = (f"; lowered to {lowered} after 429s, climbing back as "
                        "generations end without one" if lowered else "")
        click.echo(f"C = {current}{by_operator}{lowered_note}" if current
                   else "C is not set yet (no worker has started)")
        return
    old, _ = admission.set_cap(max_in_flight, by_operator=True)
    click.echo(f"C = {max_in_flight} (was {old}); applies to the next admission, and stands "
               "when workers restart until their VIDQ_MAX_IN_FLIGHT changes")


@main.command(cls=OwnSettingsCommand)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--batch", help="Batch name (default: the file's name).")
@click.option("--sandbox", "use_sandbox", is_flag=True,
              help="Run against the local sandbox upstream: no credits spent.")
# At 0 or below the run started its Redis and sandbox and then waited for ever.
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Worker processes.")
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(min=1),
              help="Pool size per worker.")
@click.option("--state-dir", default=".vidq", show_default=True, type=click.Path(path_type=Path))
@click.option("--allow-variants", is_flag=True,
              help="As for `vidq enqueue`: add jobs that differ from the batch's only by "
                   "parameters.")
@click.option("--retry", "retry_failed", is_flag=True,
              help="Put the batch's failed jobs back in line first, as `vidq retry BATCH` "
                   "does (a paid generation is polled again, never re-POSTed): `vidq retry` "
                   "cannot reach a finished run's Redis, which stopped with it.")
@click.option("--resubmit-unknown", is_flag=True,
              help="With --retry: also POST again the failed jobs whose POST's outcome is "
                   "unknown (each may have been charged already); asks first.")
@click.option("--yes", is_flag=True, help="Do not ask before --resubmit-unknown POSTs.")
def run(file, batch, use_sandbox, workers, concurrency, state_dir, allow_variants,
        retry_failed, resubmit_unknown, yes):
    """Run one batch end to end on this machine, then exit."""
    # Refuse bad settings, and a given Redis that is malformed or unreachable,
    # before starting a private Redis, the sandbox or any worker.
    settings = Settings.from_env()
    from worker.connection import connect

    from .run import run_batch

    if os.environ.get("VIDQ_REDIS_URL"):
        connect(settings.redis_url).ping()
    if use_sandbox and os.environ.get("VIDQ_REDIS_URL"):
        raise ConfigError(
            "--sandbox starts a throwaway upstream and its own workers; with VIDQ_REDIS_URL "
            "set they would join the deployment on that Redis (its workers would POST this "
            "batch's prompts to the real upstream, and this run's workers its jobs to the "
            "sandbox). Unset VIDQ_REDIS_URL: vidq run then keeps a private Redis in --state-dir")
    if resubmit_unknown and not retry_failed:
        raise InputError("--resubmit-unknown goes with --retry")
    if not use_sandbox and not settings.api_key:
        raise ConfigError("no API key: set AIMLAPI_KEY to run against the real API, or add "
                          "--sandbox to try the pipeline without spending credits")
    # The name becomes a path part and a key part: never a leading '.' or '-'.
    named_by_file = not batch
    batch = batch or re.sub(r"[^A-Za-z0-9._-]", "-", file.stem).lstrip(".-")[:128] or "batch"
    sys.exit(run_batch(file, batch, use_sandbox, workers, concurrency, state_dir, console,
                       allow_variants=allow_variants,
                       retry_failed={"resubmit_unknown": resubmit_unknown, "yes": yes}
                       if retry_failed else None, named_by_file=named_by_file))


@main.command(cls=VidqCommand)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 inside a container).")
@click.option("--port", default=9808, show_default=True, type=click.IntRange(0, 65535))
def metrics(host, port):
    """Serve the deployment's Prometheus metrics at http://HOST:PORT/metrics (read from
    Redis at each scrape; run one per deployment)."""
    from .metrics_cmd import serve_metrics

    serve_metrics(cli_settings(), host, port, click.echo)


@main.command(name="sandbox", cls=OwnSettingsCommand)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8900, show_default=True, type=click.IntRange(0, 65535))
@click.option("--time-scale", default=1.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Divide generation times by this.")
@click.option("--max-concurrency", default=2, show_default=True,
              help="Generations in flight before 429.")
@click.option("--max-submits-per-s", default=2, show_default=True,
              help="POSTs in any one wall-clock second before 429 (0: no limit).")
@click.option("--api-key", default="sandbox-key", show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Where rendered videos are cached (default ~/.cache/vidq-sandbox).")
def sandbox_command(host, port, time_scale, max_concurrency, max_submits_per_s, api_key,
                    cache_dir):
    """Run the local stand-in for the upstream API."""
    from sandbox import SandboxConfig
    from sandbox.server import CannotListen, serve_forever

    try:
        serve_forever(SandboxConfig(host=host, port=port, time_scale=time_scale,
                                    max_concurrency=max_concurrency,
                                    max_submits_per_s=max_submits_per_s, api_key=api_key,
                                    cache_dir=cache_dir))
    except CannotListen as exc:
        raise ConfigError(f"--host/--port: {exc}") from None


@main.command(cls=VidqCommand)
@click.argument("batch")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl",
              show_default=True)
@click.option("--state", "states", multiple=True, metavar="STATE",
              help="Only jobs in this state (queued, submitted, generating, overdue, "
                   "downloading, done, failed, cancelled); may be repeated.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to FILE (published whole) instead of standard output.")
def report(batch, fmt, states, output):
    """One row per job of BATCH: id, input line, prompt, parameters, state,
    storage URL, sha256, generation ids, credits, timings, error."""
    from worker.manifest import workers_storage_url

    from .enqueue import open_admission
    from .redis_unusable import redis_gone
    from .report import check_states, write_report

    chosen = check_states(states)
    settings = cli_settings()
    store = open_admission(settings).store
    if redis_gone(store.redis, settings, batch):
        count = write_report(None, batch, settings.storage_url, chosen, fmt, output)
    else:
        # Rows point where the workers store, whatever this shell's VIDQ_STORAGE_URL.
        count = write_report(store, batch,
                             workers_storage_url(store.redis, settings.storage_url),
                             chosen, fmt, output)
    if output is not None:
        click.echo(f"batch {batch}: {count} {_jobs(count)} written to {output}", err=True)

# pause, resume, cancel, limits, plan and webhooks live in their own modules;
# importing them registers them on `main` (they import `main` from here, hence the end).
from . import control, plan_cmd, webhooks_cmd  # noqa: E402,F401

if __name__ == "__main__":
    # python -m producer.cli: the modules above registered their commands on
    # producer.cli's `main`, not on this __main__ module's copy.
    from producer.cli import main as vidq

    vidq()
