"""The batch manifest: `<batch>/manifest.jsonl` (one row per job, the rows of
`vidq report`) and `<batch>/errors.jsonl` (the failed jobs' rows), written to
storage when a batch finishes, so a content pipeline or a person can map
prompt lines to files without Redis.

Who writes it, once: whoever sees the batch finished first and wins the
batch's manifest lock (`SET NX` with a lease): the reconciler's next pass
(worker/retention.py), else the next `vidq status`; `vidq purge` writes it
too, or waits while another process does. A writer that dies leaves the lock
to expire; the manifest is not marked written, so the next of them writes it
again (the objects are published whole, so a half-written manifest is never
seen). The mark records the batch's reopen count and total when the writer
started (lua/manifest_written.lua): a batch reopened meanwhile by a retry, a
late generation id or new jobs is written again when it finishes again.
"""
from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from . import events, keys
from .connection import op_id, take_lock
from .errors import InputError, StorageError
from .jobs import FINAL_STATES, State, load_script
from .rows import batch_rows, storage_base
from .storage import Storage

log = logging.getLogger(__name__)

MANIFEST, ERRORS = "manifest.jsonl", "errors.jsonl"
# Long enough to write 100,000 rows to a slow store; a dead writer's lease
# runs out after this and the next pass writes again.
LOCK_S = 600


def manifest_key(batch: str) -> str:
    return f"{batch}/{MANIFEST}"


def errors_key(batch: str) -> str:
    return f"{batch}/{ERRORS}"


@dataclass(frozen=True)
class BatchMark:
    """What decides whether a batch's manifest must be written."""

    total: int
    finished: int
    stamp: str  # '<reopened>:<total>'
    written_for: str  # the stamp of the manifest in storage ('' if none)
    expires_at: float

    @property
    def is_finished(self) -> bool:
        return self.total > 0 and self.finished >= self.total

    @property
    def manifest_current(self) -> bool:
        return bool(self.written_for) and self.written_for == self.stamp

    @property
    def needs_manifest(self) -> bool:
        return self.is_finished and not self.manifest_current


def read_marks(client: redis.Redis, batches: Iterable[str]) -> dict[str, BatchMark]:
    """Each batch's mark, in one round trip."""
    names = list(batches)
    pipe = client.pipeline(transaction=False)
    for batch in names:
        pipe.hmget(keys.batch(batch), "total", "reopened", "manifest_of", "expires_at")
        pipe.hmget(keys.batch_counts(batch), *sorted(FINAL_STATES))
    answers = pipe.execute()
    marks = {}
    for index, batch in enumerate(names):
        total, reopened, written_for, expires_at = answers[2 * index]
        finished = sum(int(n or 0) for n in answers[2 * index + 1])
        total = int(total or 0)
        marks[batch] = BatchMark(total, finished, f"{reopened or 0}:{total}", written_for or "",
                                 float(expires_at or 0))
    return marks


def write_if_finished(client: redis.Redis, storage: Storage, storage_url: str, batch: str,
                      retention_s: float) -> bool:
    """Write the manifest if the batch is finished and has none for its
    current contents, and this process wins the lock; True if written."""
    if not read_marks(client, [batch])[batch].needs_manifest:
        return False
    lock, token = keys.manifest_lock(batch), uuid.uuid4().hex
    if not take_lock(client, lock, token, LOCK_S):
        return False
    try:
        mark = read_marks(client, [batch])[batch]  # read again, under the lock
        if not mark.needs_manifest:
            return False
        if (not mark.written_for and storage.exists(manifest_key(batch))
                and not lists_only_ours(client, storage, batch)):
            # An earlier batch's of this name (purged or expired since): kept,
            # not overwritten with tonight's (review 119). Named by its bytes.
            move_earlier_aside(storage, batch, storage.sha256(manifest_key(batch))[:16])
        count, failed = write(client, storage, storage_url, batch)
        marked = events.batch_finished_script(client, storage_url, batch)(
            keys=[keys.batch(batch), keys.batch_counts(batch)],
            args=[mark.stamp, retention_s, op_id()])
        log.info("batch %s: manifest written (%d jobs, %d failed)%s", batch, count, failed,
                 "" if marked else "; the batch changed meanwhile, it will be written again")
        return bool(marked)
    finally:
        load_script(client, "release_lock")(keys=[lock], args=[token])


def write(client: redis.Redis, storage: Storage, storage_url: str, batch: str) -> tuple[int, int]:
    """Both files, streamed row by row; returns (rows, failed rows)."""
    job_ids = sorted(str(job_id) for job_id in client.smembers(keys.batch_jobs(batch)))
    rows = batch_rows(client, batch, job_ids, storage_url)
    count = failed = 0
    with storage.writer(manifest_key(batch)) as everything, \
            storage.writer(errors_key(batch)) as errors:
        for row in rows:
            line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
            everything.write(line)
            count += 1
            if row["state"] == State.FAILED:
                errors.write(line)
                failed += 1
    return count, failed


def lists_only_ours(client: redis.Redis, storage: Storage, batch: str) -> bool:
    """Whether the manifest in storage lists only videos the batch holds now
    (each row a job of it, stored with the same sha256): this batch's own,
    written before Redis lost its state, which a rerun found in storage.
    Tonight's lists them all, so it takes its place (it is not an earlier
    batch's, moved aside). Not when a row has no video (a failed row may hold
    the only record of a paid generation id), nor a damaged or empty one."""
    try:
        rows = read(storage, batch) or []
    except InputError:
        return False
    pipe = client.pipeline(transaction=False)
    for row in rows:
        pipe.hget(keys.job(keys.job_ref(batch, str(row.get("custom_id")))), "sha256")
    return bool(rows) and all(
        isinstance(row.get("sha256"), str) and row["sha256"] == digest
        for row, digest in zip(rows, pipe.execute(), strict=True))


def move_earlier_aside(storage: Storage, batch: str, tag: str) -> None:
    """The batch name came back with other requests: its manifest, if one is
    there, is an earlier batch's. Moved to `<batch>/replaced/`, beside the
    videos of it that tonight's moved aside: no pipeline reads it for
    tonight's files, nor `vidq report` after a `purge --force` (review 117),
    and tonight's manifest does not erase it (review 119). (A writer of this
    batch that died between publishing its manifest and marking it written
    leaves one that is moved too; the next writes it again.)"""
    for name in (MANIFEST, ERRORS):
        key, stem = f"{batch}/{name}", name.removesuffix(".jsonl")
        if storage.exists(key) and storage.move(key, f"{batch}/replaced/{stem}.{tag}.jsonl"):
            log.warning("batch %s: its %s in storage was an earlier batch's of this name; "
                        "moved to %s/replaced/", batch, name, batch)


def read(storage: Storage, batch: str) -> list[dict] | None:
    """The rows of a batch's manifest in storage; None if it has none.
    InputError naming the line if it is not one (damaged, or edited by hand)."""
    key = manifest_key(batch)
    if not storage.exists(key):
        return None
    rows = []
    for number, line in enumerate(storage.read_bytes(key).split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:  # bad JSON, or not UTF-8
            raise InputError(f"{storage.location(key)}: line {number} is not a manifest row "
                             f"({type(exc).__name__})") from None
        if not isinstance(row, dict):
            raise InputError(f"{storage.location(key)}: line {number} is not a manifest row "
                             "(not a JSON object)")
        rows.append(row)
    return rows


def publish_storage_url(client: redis.Redis, storage_url: str) -> None:
    """A starting worker says where the deployment's videos and manifests go,
    so a producer's shell with another VIDQ_STORAGE_URL neither writes a
    manifest elsewhere nor reports paths where nothing is."""
    client.hset(keys.CONFIG, "storage_url", storage_base(storage_url))


def workers_storage_url(client: redis.Redis, own: str) -> str:
    """The workers' storage URL (as `storage_base` gives it), else `own`'s."""
    theirs = client.hget(keys.CONFIG, "storage_url")
    return str(theirs) if theirs else storage_base(own)


def storage_is_theirs(client: redis.Redis, own: str) -> tuple[bool, str]:
    """Whether a shell's VIDQ_STORAGE_URL `own` is the workers', and theirs:
    only then may it write a batch's manifest."""
    theirs = workers_storage_url(client, own)
    return theirs == storage_base(own), theirs


def write_safely(client: redis.Redis, storage: Storage, settings, batch: str) -> None:
    """`write_if_finished` for a step: a manifest problem never fails a job
    (the reconciler's next pass writes it)."""
    try:
        write_if_finished(client, storage, settings.storage_url, batch, settings.retention_s)
    except (StorageError, redis.RedisError, OSError) as exc:
        log.warning("batch %s: manifest not written yet (%s); the reconciler retries", batch, exc)
