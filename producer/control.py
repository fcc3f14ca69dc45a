"""`vidq pause`, `resume`, `cancel` and `limits`: a batch's admission.

Registered on the `vidq` group by producer/cli.py. Every command changes
only what is still waiting: generations in flight finish and are downloaded.
"""
from __future__ import annotations

import click

from .cli import VidqCommand, _jobs, cli_settings, main
from .params import UNSET, Limit

CREDITS, VIDEOS = Limit(), Limit(whole=True)


def _admission():
    from .enqueue import open_admission

    return open_admission(cli_settings())


@main.command(cls=VidqCommand)
@click.argument("batch")
def pause(batch):
    """Stop admitting BATCH's waiting jobs (those in flight finish)."""
    from worker.batch_control import pause as pause_batch

    waiting = pause_batch(_admission(), batch)
    click.echo(f"batch {batch} paused: {waiting} {_jobs(waiting)} waiting; "
               "jobs in flight finish. `vidq resume` admits it again")


@main.command(cls=VidqCommand)
@click.argument("batch")
def resume(batch):
    """Admit BATCH's waiting jobs again."""
    from worker.admission import admit
    from worker.batch_control import admission_state
    from worker.batch_control import resume as resume_batch
    from worker.tasks import dispatch

    admission = _admission()
    waiting = resume_batch(admission, batch)
    admit(admission, dispatch)
    state = admission_state(admission, batch)
    still = f"; still {state} (`vidq limits {batch}`)" if state.startswith("paused") else ""
    click.echo(f"batch {batch} resumed: {waiting} {_jobs(waiting)} waiting{still}")


@main.command(cls=VidqCommand)
@click.argument("batch")
def cancel(batch):
    """End BATCH's waiting jobs `cancelled` (never POSTed); jobs in flight
    finish and are downloaded (they are paid for)."""
    from worker.batch_control import cancel as cancel_batch

    result = cancel_batch(_admission(), batch)
    verbs = "finishes and is" if result.in_flight == 1 else "finish and are"
    unsent = (f"; {result.unsent} admitted, not yet sent, "
              f"{'ends' if result.unsent == 1 else 'end'} cancelled" if result.unsent else "")
    click.echo(f"batch {batch} cancelled: {result.cancelled} waiting "
               f"{_jobs(result.cancelled)} cancelled; {result.in_flight} "
               f"{_jobs(result.in_flight)} in flight {verbs} downloaded{unsent}")


@main.command(cls=VidqCommand)
@click.argument("batch", required=False)
@click.option("--max-credits", type=CREDITS, default=UNSET, help="The batch's credit cap.")
@click.option("--max-videos", type=VIDEOS, default=UNSET, help="The batch's video cap.")
@click.option("--priority", type=click.Choice(["high", "normal", "low"]))
@click.option("--daily-credits", type=CREDITS, default=UNSET,
              help="The deployment's credit cap per UTC day.")
def limits(batch, max_credits, max_videos, priority, daily_credits):
    """Show or change spend caps: BATCH's (--max-credits, --max-videos,
    --priority) and the deployment's (--daily-credits). `none` removes a cap."""
    from worker import batch_control
    from worker.admission import admit
    from worker.tasks import dispatch

    admission = _admission()
    if batch is None and (max_credits, max_videos, priority) != (UNSET, UNSET, None):
        raise click.UsageError("--max-credits, --max-videos and --priority need a BATCH")
    if batch is not None:
        batch_control.check_batch(admission, batch)
        caps = {name: value for name, value in (("max_credits", max_credits),
                                                ("max_videos", max_videos)) if value != UNSET}
        if caps:
            batch_control.set_limits(admission, batch, **caps)
        if priority:
            batch_control.set_priority(admission, batch, priority)
    if daily_credits != UNSET:
        batch_control.set_daily_credits(admission, daily_credits)
    admit(admission, dispatch)
    for line in _describe(admission, batch):
        click.echo(line)


def _describe(admission, batch: str | None) -> list[str]:
    from worker.batch_control import admission_state
    from worker.spend import batch_spend, day_spend

    lines = []
    if batch is not None:
        spend = batch_spend(admission.redis, batch)
        lines.append(
            f"batch {batch} ({admission_state(admission, batch)}): max credits "
            f"{_shown(spend['max_credits'])}, max videos {_shown(spend['max_videos'])}; "
            f"{_shown(spend['spent'])} credits spent, {_shown(spend['committed'])} committed "
            f"in flight, {spend['videos']} {'video' if spend['videos'] == 1 else 'videos'}")
    today = day_spend(admission.redis)
    lines.append(f"today (UTC): daily cap {_shown(today['daily_credits'])}; "
                 f"{_shown(today['spent'])} credits spent, {_shown(today['committed'])} "
                 "committed in flight")
    return lines


def _shown(value: float | None) -> str:
    if value is None:
        return "none"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"
