"""Retention: a finished batch leaves Redis once its manifest is in storage.

A finished job costs about 2.6 KB of Redis; kept forever, every night adds
its batch for good. Once a batch's manifest (worker/manifest.py) is written,
the batch expires `VIDQ_RETENTION_S` later (default 7 days): the
reconciler's housekeeping pass removes every key of it, and `vidq report`
reads the manifest from storage instead. `vidq purge NAME` removes a batch
now. Videos, sidecars and the manifest in storage are never touched.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from . import keys, manifest
from .admission import PRIORITIES
from .storage import Storage

log = logging.getLogger(__name__)
CHUNK = 1000


@dataclass(frozen=True)
class Purged:
    jobs: int
    keys: int


def batch_keys(batch: str) -> list[str]:
    """Every key of a batch except its job hashes."""
    return [keys.batch(batch), keys.batch_counts(batch), keys.batch_jobs(batch),
            keys.batch_unknown(batch), keys.batch_failed(batch), keys.batch_finished(batch),
            keys.batch_line(batch), keys.manifest_lock(batch)]


def purge(client: redis.Redis, batch: str) -> Purged:
    """Remove the batch from Redis: its jobs (and any slot, due time or hold
    they still have) and its own keys."""
    jobs = removed = 0
    ids = list(client.sscan_iter(keys.batch_jobs(batch), count=CHUNK))
    for start in range(0, len(ids), CHUNK):
        refs = [keys.job_ref(batch, job_id) for job_id in ids[start:start + CHUNK]]
        pipe = client.pipeline(transaction=False)
        pipe.unlink(*[keys.job(ref) for ref in refs])
        for shared in (keys.SLOTS, keys.DUE, keys.SLOT_HOLDS):
            pipe.zrem(shared, *refs)
        removed += pipe.execute()[0]
        jobs += len(refs)
    # Slots held for earlier POSTs of re-POSTed jobs ('<ref>#<call id>', O(C)).
    for shared in (keys.SLOTS, keys.SLOT_HOLDS):
        held = [str(m) for m in client.zrange(shared, 0, -1)
                if str(m).startswith(keys.job_ref(batch, "")) and "#" in str(m)]
        if held:
            client.zrem(shared, *held)
    pipe = client.pipeline(transaction=False)
    pipe.unlink(*batch_keys(batch))
    pipe.srem(keys.BATCHES, batch)
    for priority in PRIORITIES:
        # A batch purged while it waited would keep its turn in a ring: enqueued
        # again under the same name, it would sit there twice (two turns a round).
        pipe.lrem(keys.ring(priority), 0, batch)
    removed += pipe.execute()[0]
    log.info("batch %s purged from Redis: %d jobs, %d keys", batch, jobs, removed)
    return Purged(jobs, removed)


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
            purge(client, batch)
            purged.append(batch)
    return purged
