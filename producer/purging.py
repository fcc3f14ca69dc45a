"""`vidq purge NAME`: remove a batch from Redis now, saying what goes.

A finished batch gets its manifest written first if it has none, so `vidq
report` still answers from storage. An unfinished batch is refused unless
`--force`: its waiting jobs would never be submitted and its generations in
flight (paid for) never downloaded. Those generations keep their slots taken
until they can no longer be running (worker/retention.py), so C holds.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import click

from worker import deployment, keys, manifest
from worker.admission import Admission
from worker.errors import InputError
from worker.leases import BATCH_LOCK_S, held_lock
from worker.posting import SHUTDOWN_WAIT_S
from worker.retention import begin_purge, purge
from worker.settings import Settings
from worker.storage import open_storage

from .retrying import plural

# How long `vidq purge` waits for another process writing the batch's manifest.
WRITER_WAIT_S = 120.0


def run_purge(admission: Admission, settings: Settings, batch: str, *, force: bool = False,
              echo: Callable[[str], None] = click.echo) -> None:
    client = admission.redis
    mark = manifest.read_marks(client, [batch])[batch]
    if mark.total == 0:
        raise InputError(f"no batch named {batch!r} in Redis")
    same, theirs = manifest.storage_is_theirs(client, settings.storage_url)
    if not same:
        raise InputError(f"this shell's VIDQ_STORAGE_URL is not the workers' ({theirs}): purge "
                         "writes the batch's manifest there first; run it with theirs "
                         "(nothing was purged)")
    storage = open_storage(settings.storage_url, settings.s3_part_bytes)
    if not mark.is_finished:
        if not force:
            left = mark.total - mark.finished
            raise InputError(
                f"batch {batch!r} is not finished ({mark.finished} of {mark.total} jobs ended): "
                f"purging it drops its {plural(left, 'unfinished job')} (waiting ones are "
                "never submitted, generations in flight are paid for and never downloaded) "
                "and writes no manifest; add --force to remove it anyway")
    else:
        _refuse_while_answers_may_come(client, settings, batch, force)
        if not mark.manifest_current:
            write_manifest(client, storage, settings, batch)
    # Checked and marked in one step: a retry landing between a check and
    # the purge was removed with the batch, its paid video never fetched.
    # Under the batch's enqueue lock: an enqueue writing meanwhile wrote jobs
    # after the purge ended, into a batch nobody listed (review 144).
    with held_lock(client, keys.batch_enqueue_lock(batch), BATCH_LOCK_S,
                   lambda left: echo(f"waiting for an enqueue of batch {batch!r} to end")):
        now = manifest.read_marks(client, [batch])[batch]
        if not begin_purge(client, batch, "" if force else now.stamp):
            raise InputError(f"batch {batch!r} was reopened (a retry, a late generation id or "
                             "new jobs) while its manifest was written; nothing removed")
        purged = purge(client, batch, settings, longest_deadline_s(client, settings))
    written = now.manifest_current
    echo(f"batch {batch}: removed from Redis: {plural(purged.jobs, 'job record')} and every "
         f"key of the batch ({purged.keys} keys)")
    if purged.held:
        one = purged.held == 1
        echo(f"{plural(purged.held, 'generation')} of it may still be running upstream: "
             f"{'its slot stays' if one else 'their slots stay'} taken until "
             f"{'it' if one else 'they'} can no longer be running, as for a POST of unknown "
             "outcome (C holds)")
    if written:
        echo(f"videos, sidecars and the manifest stay in storage: "
             f"{storage.location(manifest.manifest_key(batch))} (`vidq report {batch}` reads it)")
    else:
        echo("videos and sidecars stay in storage; no manifest was written")


def longest_deadline_s(client, settings: Settings) -> float:
    """VIDQ_DEADLINE_S as the live workers have it (the longest, if they
    disagree), else as this shell does: a purged generation's slot is held
    that long while nothing is learned, as the workers hold an unknown POST's."""
    theirs = [float(values["VIDQ_DEADLINE_S"])
              for values in deployment.live_values(client).values()
              if isinstance(values.get("VIDQ_DEADLINE_S"), int | float)]
    return max(theirs) if theirs else settings.deadline_s


def _refuse_while_answers_may_come(client, settings: Settings, batch: str, force: bool) -> None:
    """A POST whose outcome is unknown may still answer: its worker keeps
    reading it, then waits for it at shutdown. A generation id arriving after
    the purge has no job to land in (it goes to `vidq:orphans`, unfetched)."""
    if force:
        return
    seconds, micros = client.time()
    on_the_wire = client.zcount(keys.batch_open_posts(batch), seconds * 1000 + micros // 1000,
                                "+inf")
    if on_the_wire:
        raise InputError(
            f"batch {batch!r} has {plural(on_the_wire, 'POST')} whose answer is still being "
            "read or recorded: a late generation id would find no job to land in; purge "
            "again once it is in, or add --force")
    # Set (Redis clock) when a job fails "outcome unknown" and when one is
    # re-POSTed while its earlier POST may still answer.
    last = float(client.hget(keys.batch(batch), "unknown_post_at") or 0)
    ago_s, window_s = seconds + micros / 1e6 - last, settings.http_timeout_s + SHUTDOWN_WAIT_S
    if ago_s < window_s:
        raise InputError(
            f"batch {batch!r} has a POST whose answer may still come (its outcome became "
            f"unknown {ago_s:.0f} s ago): a late generation id would find no job to land in; "
            f"purge again in {window_s - ago_s:.0f} s, or add --force")


def write_manifest(client, storage, settings: Settings, batch: str) -> None:
    """Write the batch's manifest, or wait while another process (the
    reconciler, `vidq status`) writes it: purging under a writer would leave
    it reading jobs already gone, and a manifest missing their rows; `vidq
    run` stopping its workers under one, a manifest cut short."""
    deadline = time.monotonic() + WRITER_WAIT_S
    while True:
        manifest.write_if_finished(client, storage, settings.storage_url, batch,
                                   settings.retention_s)
        if (manifest.read_marks(client, [batch])[batch].manifest_current
                or not client.exists(keys.manifest_lock(batch))):
            return
        if time.monotonic() > deadline:
            raise InputError(f"the manifest of batch {batch!r} is being written by another "
                             f"process; run `vidq purge {batch}` again when it is done")
        time.sleep(0.2)
