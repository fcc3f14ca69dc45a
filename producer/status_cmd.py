"""`vidq status NAME` and `vidq batches`: what they print, and their exit status.

`vidq status` on a finished batch whose manifest is missing (its writer
died) writes it; on a batch that has left Redis it reads the manifest from
storage. With `--watch` the exit status is 1 if any job failed.
"""
from __future__ import annotations

import json
from collections import Counter

import click
from rich.console import Console

from worker import keys, manifest
from worker.admission import Admission
from worker.errors import InputError
from worker.retry import Failure
from worker.settings import Settings
from worker.spend import amount
from worker.storage import open_storage

from .batch_view import batch_status, top_reasons
from .progress import describe, duration, ended_line, reasons_text, summary_line, warnings, watch


def show_status(admission: Admission, settings: Settings, batch: str, console: Console, *,
                as_json: bool, follow: bool, every_s: float) -> int:
    """Print BATCH's status; returns the exit status."""
    status = batch_status(admission, batch, settings)
    if status["total"] == 0:
        return show_from_manifest(settings, batch, as_json, follow)
    if follow:
        status = watch(admission, batch, console, settings=settings, every_s=every_s)
    status["manifest"] = _manifest(admission, settings, batch)
    if as_json:
        click.echo(json.dumps(status))
    elif follow:
        _closing(status)
    else:
        _plain(status)
    return 1 if follow and status["counts"].get("failed") else 0


def _plain(status: dict) -> None:
    click.echo(f"{status['batch']}: {summary_line(status)}")
    _reasons(status)
    credits = status["credits"]
    if credits["spent"] or credits["committed"]:
        click.echo(f"  credits: {credits['spent']:,.0f} spent, {credits['committed']:,.0f} "
                   "committed in flight")
    for warning in warnings(status):
        click.echo(f"warning: {warning}")
    if status["manifest"]:
        click.echo(f"  manifest: {status['manifest']}")


def _closing(status: dict) -> None:
    click.echo(f"{status['batch']}: {ended_line(status)}")
    _reasons(status)


def _reasons(status: dict) -> None:
    if status["failures"]["count"]:
        click.echo(f"  {status['failures']['count']} failed, by reason:")
        for line in reasons_text(status):
            click.echo(f"    {line}")


def _manifest(admission: Admission, settings: Settings, batch: str) -> str | None:
    """Write the finished batch's manifest if this shell's storage is the
    workers' (else leave it to them); where it is, once written."""
    same, theirs = manifest.storage_is_theirs(admission.redis, settings.storage_url)
    if same:
        storage = open_storage(settings.storage_url, settings.s3_part_bytes)
        manifest.write_safely(admission.redis, storage, settings, batch)
        where = storage.location(manifest.manifest_key(batch))
    else:
        click.echo(f"note: this shell's VIDQ_STORAGE_URL is not the workers' ({theirs}): "
                   "the manifest is theirs to write", err=True)
        where = f"{theirs}/{manifest.manifest_key(batch)}"
    # A batch reopened (a retry, a late id) has only an out-of-date one.
    return where if manifest.read_marks(admission.redis, [batch])[batch].manifest_current else None


def show_from_manifest(settings: Settings, batch: str, as_json: bool,
                       follow: bool = False) -> int:
    """A batch that has left Redis, as its manifest tells it: the same counts,
    failures by reason, outcome-unknown jobs and credits `vidq status` shows
    (a manifest is written once every job has ended: nothing to watch), and
    with `--watch` the same exit status."""
    storage = open_storage(settings.storage_url, settings.s3_part_bytes)
    rows = manifest.read(storage, batch)
    if rows is None:
        raise InputError(f"no batch named {batch!r}")
    summary = _manifest_summary(rows)
    summary.update(batch=batch, expired=True,
                   manifest=storage.location(manifest.manifest_key(batch)))
    if as_json:
        click.echo(json.dumps(summary))
    else:
        # `vidq run` keeps its batches in a Redis of its own, stopped with the run.
        click.echo(f"{batch}: not in this Redis (purged, expired after VIDQ_RETENTION_S, or "
                   "run by `vidq run` on a Redis of its own); from its manifest: "
                   + ", ".join(f"{n} {state}" for state, n in sorted(summary["counts"].items()))
                   + f"; {summary['manifest']}")
        _reasons(summary)
        if summary["outcome_unknown"]:
            click.echo(f"  {summary['outcome_unknown']} failed with an unknown outcome (may "
                       "have been charged)")
        if summary["credits"]["spent"]:
            click.echo(f"  credits: {summary['credits']['spent']:,.0f} spent")
    return 1 if follow and summary["counts"].get("failed") else 0


def _manifest_summary(rows: list[dict]) -> dict:
    failed = [row for row in rows if row.get("state") == "failed"]
    found = [Failure(str(row.get("custom_id") or ""), str(row.get("error") or ""), "",
                     bool(row.get("outcome_unknown"))) for row in failed]
    states = Counter(str(row.get("state") or "unknown") for row in rows)
    return {"total": len(rows), "counts": dict(states),
            "outcome_unknown": sum(1 for row in failed if row.get("outcome_unknown")),
            "failures": top_reasons(found),
            "credits": {"spent": sum(amount(row.get("credits")) for row in rows)}}


def show_batches(admission: Admission, settings: Settings, as_json: bool) -> None:
    names = sorted(str(name) for name in admission.redis.smembers(keys.BATCHES))
    found = [batch_status(admission, name, settings) for name in names]
    found = [status for status in found if status["total"]]
    if as_json:
        click.echo(json.dumps([_brief(status) for status in found]))
        return
    if not found:
        click.echo("no batches")
        return
    for status in found:
        click.echo(f"{status['batch']}: {status['finished']}/{status['total']} ended, "
                   f"age {duration(status['age_s'])}; {describe(status, with_deployment=False)}"
                   f"; {status['rate_per_min']:g}/min, ETA {duration(status['eta_s'])}")


def _brief(status: dict) -> dict:
    names = ("batch", "total", "counts", "finished", "in_flight", "waiting", "admission",
             "age_s", "rate_per_min", "eta_s", "eta_basis", "outcome_unknown")
    return {name: status[name] for name in names}
