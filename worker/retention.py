"""Retention: a finished batch leaves Redis once its manifest is in storage.

A finished job costs about 2.6 KB of Redis; kept forever, every night adds
its batch for good. Once a batch's manifest (worker/manifest.py) is written,
the batch expires `VIDQ_RETENTION_S` later (default 7 days): the
reconciler's housekeeping pass removes every key of it, and `vidq report`
reads the manifest from storage instead. `vidq purge NAME` removes a batch
now. Videos, sidecars and the manifest in storage are never touched.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass

import redis

from . import keys, manifest
from .admission import PRIORITIES
from .durations import DurationModel
from .job_rules import generation_hold_s
from .jobs import load_script
from .leases import BATCH_LOCK_S, held_lock
from .settings import Settings
from .storage import Storage

log = logging.getLogger(__name__)
CHUNK = 1000


@dataclass(frozen=True)
class Purged:
    jobs: int
    keys: int
    held: int = 0  # slots kept taken: generations that may still run upstream


def batch_keys(batch: str) -> list[str]:
    """Every key of a batch except its job hashes."""
    return [keys.batch(batch), keys.batch_counts(batch), keys.batch_jobs(batch),
            keys.batch_unknown(batch), keys.batch_failed(batch), keys.batch_finished(batch),
            keys.batch_line(batch), keys.manifest_lock(batch)]


def begin_purge(client: redis.Redis, batch: str, stamp: str) -> bool:
    """Mark `batch` as being purged if it is still finished and as `stamp`
    (its mark's) says; '' marks it whatever it is (--force). Retries and
    enqueues into it are refused from then on (lua/begin_purge.lua)."""
    script = load_script(client, "begin_purge")
    return script(keys=[keys.batch(batch), keys.batch_counts(batch)], args=[stamp]) == 1


def purge(client: redis.Redis, batch: str, settings: Settings,
          deadline_s: float | None = None) -> Purged:
    """Remove the batch from Redis: its jobs (their due times, holds and
    slots) and its own keys. A job whose generation may still be running
    upstream keeps its slot taken until it can no longer run, as a POST of
    unknown outcome does (lua/purge_jobs.lua): nobody polls it any more, and
    its slot given to another job would pass C. `deadline_s` (default:
    VIDQ_DEADLINE_S) is such a hold's length while nothing is learned."""
    deadline_s = settings.deadline_s if deadline_s is None else deadline_s
    script = load_script(client, "purge_jobs")
    holds = generation_holds(client, batch, settings, deadline_s)
    jobs = removed = held = 0
    ids = list(client.sscan_iter(keys.batch_jobs(batch), count=CHUNK))
    for start in range(0, len(ids), CHUNK):
        args = [repr(deadline_s)]
        chunk = ids[start:start + CHUNK]
        for job_id in chunk:
            ref = keys.job_ref(batch, job_id)
            args += [ref, repr(holds[ref]) if ref in holds else ""]
        gone, kept = script(keys=[keys.SLOTS, keys.DUE, keys.SLOT_HOLDS], args=args)
        removed, held, jobs = removed + int(gone), held + int(kept), jobs + len(chunk)
    # Slots held for earlier POSTs of re-POSTed jobs ('<ref>#<call id>') stay
    # until their holds end, for the same reason.
    pipe = client.pipeline(transaction=False)
    pipe.unlink(*batch_keys(batch))
    pipe.srem(keys.BATCHES, batch)
    for priority in PRIORITIES:
        # A batch purged while it waited would keep its turn in a ring: enqueued
        # again under the same name, it would sit there twice (two turns a round).
        pipe.lrem(keys.ring(priority), 0, batch)
    removed += pipe.execute()[0]
    if held:
        log.warning("batch %s purged while %d of its generations may still run upstream: "
                    "their slots stay taken until they can no longer run", batch, held)
    log.info("batch %s purged from Redis: %d jobs, %d keys", batch, jobs, removed)
    return Purged(jobs, removed, held)


def generation_holds(client: redis.Redis, batch: str, settings: Settings,
                     deadline_s: float) -> dict[str, float]:
    """How long the slot of each of the batch's slot holders stays taken if
    its generation may still run when it is purged: as long as an unknown
    POST's (job_rules.generation_hold_s). O(C)."""
    durations = DurationModel(client, settings.expected_generation_s)
    prefix = keys.job_ref(batch, "")
    refs = [str(ref) for ref in client.zrange(keys.SLOTS, 0, -1) if str(ref).startswith(prefix)]
    pipe = client.pipeline(transaction=False)
    for ref in refs:
        pipe.hget(keys.job(ref), "request")
    holds = {}
    for ref, raw in zip(refs, pipe.execute(), strict=True):
        # An unreadable request is held `deadline_s` (the script's default).
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            if raw:
                holds[ref] = generation_hold_s(deadline_s, durations, json.loads(raw))
    return holds


def housekeeping(client: redis.Redis, storage: Storage, settings) -> list[str]:
    """One pass over every batch: write the manifests that are due, purge the
    batches whose retention has run out; returns the purged batches."""
    batches = sorted(str(name) for name in client.smembers(keys.BATCHES))
    if not batches:
        return []
    seconds, micros = client.time()
    now = seconds + micros / 1e6
    purged = []
    for batch, mark in manifest.read_marks(client, batches).items():
        if mark.needs_manifest:
            manifest.write_safely(client, storage, settings, batch)
        elif mark.is_finished and mark.manifest_current and mark.expires_at <= now:
            # Not while an enqueue writes into it (its lock): jobs written
            # after the purge ended made a batch nobody listed (review 144).
            with held_lock(client, keys.batch_enqueue_lock(batch), BATCH_LOCK_S,
                           patient=False) as fence:
                if fence and begin_purge(client, batch, mark.stamp):  # not if reopened
                    purge(client, batch, settings)
                    purged.append(batch)
    return purged
