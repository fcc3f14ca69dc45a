"""Keep a long step's lease while it runs.

A claim leases a step for as long as it may run (`Settings.grace_s`); past
that, the reconciler takes it for lost and sends it again. A download over a
slow link can outlive any fixed lease, and a second copy then competes with
the first for the same bandwidth, so neither finishes in time and the job
never ends. While a step runs, a thread renews its lease every third of it;
when the renewal finds the token gone, the step stops as taken over.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator

import redis

from .jobs import Job, JobStore

log = logging.getLogger(__name__)


class TakenOver(Exception):
    """Another copy of this step owns the job now."""


@contextlib.contextmanager
def lease_renewed(store: JobStore, job: Job, lease_s: float) -> Iterator[threading.Event]:
    """Renew `job`'s lease while the block runs; the event is set if it was lost."""
    stop, lost = threading.Event(), threading.Event()

    def renew() -> None:
        while not stop.wait(lease_s / 3):
            try:
                if not store.renew_lease(job, lease_s):
                    lost.set()
                    return
            except redis.RedisError as exc:  # the lease has two more thirds
                log.warning("job %s: lease not renewed (%s); trying again", job.ref, exc)

    thread = threading.Thread(target=renew, name=f"lease {job.ref}", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join()


def unless_lost(chunks: Iterable[bytes], lost: threading.Event) -> Iterator[bytes]:
    """`chunks`, stopped with TakenOver once the lease is lost."""
    for chunk in chunks:
        if lost.is_set():
            raise TakenOver
        yield chunk
