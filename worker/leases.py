"""Keep a long step's lease while it runs.

A claim leases a step for as long as it may run (`Settings.grace_s`); past
that, the reconciler takes it for lost and sends it again. A download over a
slow link can outlive any fixed lease, and a second copy then competes with
the first for the same bandwidth, so neither finishes in time and the job
never ends. While a step runs, a thread renews its lease every third of it;
when the renewal finds the token gone, the step stops as taken over.
A lock held for a long block (a producer's enqueue) is renewed the same way.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import redis

from .connection import take_lock
from .jobs import Job, JobStore, load_script

log = logging.getLogger(__name__)


class TakenOver(Exception):
    """Another copy of this step owns the job now."""


@contextlib.contextmanager
def renewed(renew: Callable[[], bool], lease_s: float, name: str) -> Iterator[threading.Event]:
    """Call `renew` every third of `lease_s` while the block runs; the event
    is set once it answers False (the lease is someone else's now). A Redis
    error leaves the lease two more thirds: it is tried again."""
    stop, lost = threading.Event(), threading.Event()

    def run() -> None:
        while not stop.wait(lease_s / 3):
            try:
                if not renew():
                    lost.set()
                    return
            except redis.RedisError as exc:
                log.warning("%s not renewed (%s); trying again", name, exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join()


def lease_renewed(store: JobStore, job: Job, lease_s: float):
    """Renew `job`'s lease while the block runs; the event is set if it was lost."""
    return renewed(lambda: store.renew_lease(job, lease_s), lease_s, f"lease of job {job.ref}")


WAIT_NOTICE_S = 2.0
# A batch's enqueue lock (keys.batch_enqueue_lock): held by an enqueue while
# it writes, and by a purge while it removes the batch.
BATCH_LOCK_S = 30.0


@dataclass(frozen=True)
class Fence:
    """A held lock, for writes that must not land once it lapsed: a holder
    stopped longer than the TTL (SIGSTOP, a suspended laptop) resumes
    believing it still holds it, while another has taken it meanwhile. Its
    writes check `token` is still at `key` (review 114)."""
    key: str
    token: str

    def held(self, client: redis.Redis) -> bool:
        return client.get(self.key) == self.token


@contextlib.contextmanager
def held_lock(client: redis.Redis, key: str, ttl_s: float,
              waiting: Callable[[float], None] | None = None,
              patient: bool = True) -> Iterator[Fence | None]:
    """Wait for the lock, hold it while the block runs (renewed every third
    of its TTL), then free it. A holder that dies frees it within `ttl_s`;
    one that stood still that long finds it gone only through the `Fence`.
    `waiting(seconds its holder still has)` is called once, if the wait
    lasts over WAIT_NOTICE_S: a silent wait looks like a hang. Not
    `patient`: no wait; the block gets None if another holds it."""
    token = os.urandom(8).hex()
    notice_at = time.monotonic() + WAIT_NOTICE_S
    while not take_lock(client, key, token, ttl_s):
        if not patient:
            yield None
            return
        if waiting is not None and time.monotonic() >= notice_at:
            waiting(max(0, client.pttl(key)) / 1000)
            waiting = None
        time.sleep(0.1)
    script = load_script(client, "renew_lock")

    def renew() -> bool:
        script(keys=[key], args=[token, int(ttl_s * 1000)])
        return True  # the holder goes on either way: its block is not interruptible

    try:
        with renewed(renew, ttl_s, f"lock {key}"):
            yield Fence(key, token)
    finally:
        load_script(client, "release_lock")(keys=[key], args=[token])


def unless_lost(chunks: Iterable[bytes], lost: threading.Event) -> Iterator[bytes]:
    """`chunks`, stopped with TakenOver once the lease is lost."""
    for chunk in chunks:
        if lost.is_set():
            raise TakenOver
        yield chunk
