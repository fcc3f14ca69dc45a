"""Paid generation ids on the worker's own disk, until Redis holds them.

Between the upstream's answer to a POST and Redis recording its id
(posting.record_paid, which retries through an outage), the id lives only in
the worker's memory. A worker stopped then (a deploy, `vidq run` stopping its
workers after its Redis died, a SIGKILL) lost a paid video, and its job ended
"outcome unknown". So the answer is appended here first, fsynced; a second
line says when Redis has it.

Each process appends to a file of its own and holds an exclusive lock (flock)
on it while it lives. A file whose lock can be taken was left by a process
that died: a worker sharing the directory records the ids still pending, as
the answering process would have (lua/record_generation.lua: kept, a failed
job revived, a second id a sibling, the same id again nothing), then deletes
the file. An entry names the Redis it belongs to by an id kept in that Redis
(a URL changes with a port or a failover), read with the POST's marker: a
worker of another Redis, or of this one flushed since, leaves it alone.

flock is what tells a live process from a dead one: the directory must be on
a local filesystem (NFS emulates it with per-process POSIX locks), shared by
the workers of one machine.

    {"paid": "<generation id>", "batch": "night", "id": "7", "op": "<marker call id>",
     "redis": "<deployment id>", "at": 1764998400.1}
    {"recorded": "<generation id>"}
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import redis

from . import keys
from .durability import Durability, NotDurable
from .jobs import Job, JobStore
from .storage import fsync_dir

log = logging.getLogger(__name__)

REPLAY_EVERY_S = 30.0
# A file still named *.tmp this long after it was made is one whose process
# died between making and naming it: it holds nothing.
STALE_TMP_S = 3600.0


def deployment_id(client: redis.Redis) -> str:
    """The id this Redis's deployment is known by (made on first use)."""
    client.hsetnx(keys.CONFIG, "deployment_id", new_deployment_id())
    return str(client.hget(keys.CONFIG, "deployment_id") or "")


def new_deployment_id() -> str:
    return os.urandom(8).hex()


def check_directory(directory: Path) -> None:
    """OSError if no journal file can be made in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".probe-{os.getpid()}-{os.urandom(3).hex()}"
    probe.write_text("")
    probe.unlink()


class PaidJournal:
    """This process's journal file in `directory` (made on the first entry)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self._owner = 0  # the pid that opened _file: a forked child opens its own
        self._pending: set[str] = set()
        _JOURNALS.add(self)

    def paid(self, job: Job, generation_id: str) -> None:
        """Journal a POST's answer; `job.extra["deployment"]` names the Redis
        its marker went to (marker.mark_posting)."""
        self._append({"paid": generation_id, "batch": job.batch, "id": job.id,
                      "op": str(job.extra.get("posting_op", "")),
                      "redis": str(job.extra.get("deployment", "")),
                      "at": round(time.time(), 3)}, generation_id, pending=True)

    def recorded(self, generation_id: str) -> None:
        self._append({"recorded": generation_id}, generation_id, pending=False)

    def _append(self, entry: dict, generation_id: str, pending: bool) -> None:
        with self._lock:
            if self._file is None or self._owner != os.getpid():
                self._open()
            assert self._file is not None
            if not pending and generation_id in self._pending and len(self._pending) == 1:
                # Nothing else pending: the file starts over, so it stays small.
                self._file.seek(0)
                self._file.truncate()
            else:
                self._file.write(json.dumps(entry) + "\n")
                self._file.flush()
            os.fsync(self._file.fileno())
            (self._pending.add if pending else self._pending.discard)(generation_id)

    def _open(self) -> None:
        """Made under a name replay() does not read, locked, then named: a
        replay never finds it unlocked (and deletes it) in between."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        made = self.directory / f"{name}.tmp"
        handle = open(made, "a+", encoding="utf-8")  # noqa: SIM115 - lives with the process
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            made.rename(self.directory / f"{name}.jsonl")
            fsync_dir(self.directory)
        except OSError:
            handle.close()
            raise
        self._file, self._owner, self._pending = handle, os.getpid(), set()

    def _forget(self) -> None:
        """In a forked child: the parent's file and lock stay the parent's."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._file, self._owner, self._pending = None, 0, set()
        self._lock = threading.Lock()


_JOURNALS: weakref.WeakSet[PaidJournal] = weakref.WeakSet()
# Dead processes' files a replay holds open (and locked) in this process.
_REPLAYING: set[IO[str]] = set()
# Files of another Redis already logged by this process (logged once each).
_REPORTED: set[Path] = set()


def _forget_after_fork() -> None:
    """A forked child (a pool child replaced while a replay runs) must not
    share a lock: the file would look alive for as long as the child lives."""
    for journal in list(_JOURNALS):
        journal._forget()
    for handle in list(_REPLAYING):
        with contextlib.suppress(OSError):
            handle.close()
    _REPLAYING.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def replay(directory: Path, store: JobStore, lease_s: float,
           durability: Durability | None) -> int:
    """Record the pending ids of files whose process died; returns how many.
    Redis unreachable stops the pass: the next one starts over."""
    if not directory.is_dir():
        return 0
    deployment = deployment_id(store.redis)  # read again: Redis may have been flushed
    count = 0
    for path in sorted(directory.glob("*.jsonl")):
        with _abandoned(path) as handle:
            if handle is not None:
                count += _replay_file(path, handle, store, deployment, lease_s, durability)
    for path in directory.glob("*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > STALE_TMP_S:
                path.unlink()
    return count


def _replay_file(path: Path, handle: IO[str], store: JobStore, deployment: str,
                 lease_s: float, durability: Durability | None) -> int:
    pending = _pending(handle, path)
    ours = [entry for entry in pending if entry.get("redis") == deployment]
    kept = len(pending) - len(ours)
    for entry in ours:
        job = Job(batch=entry["batch"], id=entry["id"], request={}, state="",
                  extra={"posting_op": entry.get("op", "")})
        try:
            store.record_generation(job, entry["paid"], lease_s, durability)
        except NotDurable:
            kept += 1  # the script ran; recorded again (the same answer) next pass
        log.warning("job %s: generation %s, from the journal of a process that died before "
                    "Redis had it (%s): in Redis now", job.ref, entry["paid"], path)
    if kept == 0:
        path.unlink(missing_ok=True)
    elif len(ours) < len(pending) and path not in _REPORTED:
        _REPORTED.add(path)
        log.error("%s: %d paid generation id(s) journaled for another Redis than this "
                  "worker's (deployment id %s; flushed since, or another deployment's): "
                  "kept, not recorded here", path, len(pending) - len(ours), deployment)
    return len(ours)


@contextlib.contextmanager
def _abandoned(path: Path) -> Iterator[IO[str] | None]:
    """The file, locked, if no live process holds it and no other replay
    deleted it meanwhile; else None."""
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        yield None
        return
    _REPLAYING.add(handle)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield handle if os.fstat(handle.fileno()).st_nlink else None
    finally:
        _REPLAYING.discard(handle)
        handle.close()


def _pending(handle: IO[str], path: Path) -> list[dict]:
    """The entries whose id has no "recorded" line after it."""
    paid: dict[str, dict] = {}
    for number, line in enumerate(handle, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            # The last line of a process killed mid-write: that id never
            # reached the disk (nor Redis, which is told after).
            log.warning("%s:%d: unreadable journal line skipped", path, number)
            continue
        if not isinstance(entry, dict):
            continue
        if all(isinstance(entry.get(name), str) for name in ("paid", "batch", "id")):
            paid[entry["paid"]] = entry
        elif "recorded" in entry:
            paid.pop(entry["recorded"], None)
    return list(paid.values())

