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
the file (under a Redis that may lose what it acknowledged, everysec, once
the same Redis still runs durability.SETTLE_S later). An entry names the
Redis it belongs to by an id kept in that Redis (a URL changes with a port
or a failover), read with the POST's marker: a worker of another Redis, or
of this one flushed since, leaves it alone.

flock is what tells a live process from a dead one: the directory must be on
a local filesystem (NFS emulates it with per-process POSIX locks), shared by
the workers of one machine.

    {"paid": "<generation id>", "batch": "night", "id": "7", "op": "<marker call id>",
     "redis": "<deployment id>", "enqueued": 1764998300.2, "at": 1764998400.1}
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
from .durability import SETTLE_S, Durability, NotDurable, same_run_after, settling_run
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
                      "enqueued": job.enqueued_at,
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
        with _FORK_LOCK:  # a child forked now must find it in self._file, to close it
            handle = open(made, "a+", encoding="utf-8")  # noqa: SIM115 - lives with the process
            self._file, self._owner, self._pending = handle, os.getpid(), set()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            made.rename(self.directory / f"{name}.jsonl")
            fsync_dir(self.directory)
        except OSError:
            self._close()
            raise

    def _close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._file, self._owner, self._pending = None, 0, set()

    def _forget(self) -> None:
        """In a forked child: the parent's file and lock stay the parent's."""
        self._close()
        self._lock = threading.Lock()


_JOURNALS: weakref.WeakSet[PaidJournal] = weakref.WeakSet()
# Dead processes' files a replay holds open (and locked) in this process.
_REPLAYING: set[IO[str]] = set()
# Held while a journal file is opened or closed, and across fork(): a child
# never gets a handle this process has not yet listed (and so cannot close).
_FORK_LOCK = threading.Lock()
# One replay at a time in a process: a pass that finds a dead child's file
# held by another pass waits for it, not skips it (tasks.step_lost).
_REPLAY_LOCK = threading.Lock()
# Files of another Redis already logged by this process (logged once each).
_REPORTED: set[Path] = set()


def _after_fork_in_child() -> None:
    """A forked child (a pool child replaced while a replay runs) must not
    share a lock: the file would look alive for as long as the child lives."""
    global _FORK_LOCK, _REPLAY_LOCK
    _FORK_LOCK, _REPLAY_LOCK = threading.Lock(), threading.Lock()
    for journal in list(_JOURNALS):
        journal._forget()
    for handle in list(_REPLAYING):
        with contextlib.suppress(OSError):
            handle.close()
    _REPLAYING.clear()


os.register_at_fork(before=lambda: _FORK_LOCK.acquire(),
                    after_in_parent=lambda: _FORK_LOCK.release(),
                    after_in_child=_after_fork_in_child)


def replay(directory: Path, store: JobStore, lease_s: float,
           durability: Durability | None) -> int:
    """Record the pending ids of files whose process died; returns how many.
    Redis unreachable stops the pass (the next one starts over); a file that
    cannot be read is logged and passed over."""
    if not directory.is_dir():
        return 0
    # A dead process's file stays locked while its replay waits on Redis: a
    # worker cut off from Redis must not hold it from one that is not
    # (posting.answered_in_journal; review 103).
    store.redis.ping()
    count = 0
    with _REPLAY_LOCK:
        for path in sorted(directory.glob("*.jsonl")):
            try:
                with _abandoned(path) as handle:
                    if handle is not None:
                        count += _replay_file(path, handle, store, lease_s, durability)
            except (OSError, ValueError) as exc:
                log.error("%s: paid-id journal file not read (%s)", path, exc)
    for path in directory.glob("*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > STALE_TMP_S:
                path.unlink()
    return count


def replay_now(directory: Path, store: JobStore, durability: Durability | None) -> bool:
    """replay() by a worker for whatever dead process left ids: each made due
    at once (lease 0: no step of the dead process will poll it). False, and
    logged, if Redis or the disk failed: the next pass tries again."""
    try:
        replay(directory, store, 0.0, durability)
    except (redis.RedisError, OSError) as exc:
        log.warning("paid-id journal not replayed yet: %s", exc)
        return False
    return True


def _replay_file(path: Path, handle: IO[str], store: JobStore, lease_s: float,
                 durability: Durability | None) -> int:
    foreign, recorded, kept = [], [], 0
    run = settling_run(store.redis, durability)
    for entry in _pending(handle, path):
        job = Job(batch=entry["batch"], id=entry["id"], request={}, state="",
                  enqueued_at=_number(entry.get("enqueued")),
                  extra={"posting_op": entry.get("op", "")})
        try:
            # The script checks the entry's Redis is this one (never record
            # another's, or this one's before a flush), in the same step.
            answer = store.record_generation(job, entry["paid"], lease_s, durability,
                                             deployment=entry.get("redis") or "?")
        except NotDurable:
            kept += 1  # recorded, not yet durable: recorded again (the same answer) next pass
            continue
        if answer == "foreign":
            foreign.append(entry)
            continue
        recorded.append(entry)
    if recorded and run and not same_run_after(store.redis, run):
        # Redis restarted before its disk had them (everysec): all still
        # pending, recorded again next pass. (A Redis down now raises: the same.)
        log.warning("%s: Redis restarted within %.0f s of recording %d journaled id(s): "
                    "recording them again", path, SETTLE_S, len(recorded))
        return 0
    for entry in recorded:
        handle.write(json.dumps({"recorded": entry["paid"]}) + "\n")  # if the file is kept
        log.warning("job %s: generation %s, journaled by a process that died with it "
                    "pending (%s): in Redis", keys.job_ref(entry["batch"], entry["id"]),
                    entry["paid"], path)
    if foreign and path not in _REPORTED:
        _REPORTED.add(path)
        log.error("%s: %d paid generation id(s) journaled for another Redis (deployment id %s; "
                  "this Redis is %s): kept, not recorded here. If that Redis still runs, start "
                  "one of its workers with VIDQ_JOURNAL_DIR=%s; if it was flushed, the file "
                  "lists what was paid for", path, len(foreign), foreign[0].get("redis"),
                  store.redis.hget(keys.CONFIG, "deployment_id"), path.parent)
    if foreign or kept:
        handle.flush()
        os.fsync(handle.fileno())
    else:
        path.unlink(missing_ok=True)
    return len(recorded)


def _number(value: object) -> float:
    """An entry's number, 0.0 (not known) if it has none: older entries."""
    return float(value) if isinstance(value, int | float) else 0.0


@contextlib.contextmanager
def _abandoned(path: Path) -> Iterator[IO[str] | None]:
    """The file, locked and open to append, if no live process holds it and
    no other replay deleted it meanwhile; else None."""
    handle: IO[str] | None = None
    with _FORK_LOCK, contextlib.suppress(FileNotFoundError):
        opened = open(path, "a+", encoding="utf-8", errors="replace")  # noqa: SIM115
        _REPLAYING.add(opened)
        handle = opened
    if handle is None:
        yield None
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        handle.seek(0)
        yield handle if os.fstat(handle.fileno()).st_nlink else None
    finally:
        with _FORK_LOCK:
            handle.close()
            _REPLAYING.discard(handle)


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

