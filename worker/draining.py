"""A stopping worker's heartbeat, until its process exits.

A warm shutdown (SIGTERM: a deploy, a pod evicted) stops fetching at once
but lets the pool finish the steps it runs: a download may take minutes, a
POST its deadline. The heartbeat used to go as the shutdown began, so the
reconciler took those steps for lost and sent them again, and a second copy
of a download stored the video again after its job was done (review 102).
It now says "stopping" until the process exits: the steps its pool runs
(claimed) stay its own, while the countdown polls it holds, which will not
run here, are sent again at once (recovery.lost_steps). At exit it goes; a
process killed first leaves it to lapse in a heartbeat TTL.
"""
from __future__ import annotations

import atexit
import contextlib
import threading

import redis

from . import keys


def beat_until_exit(client: redis.Redis, hostname: str, ttl_s: float,
                    interval_s: float) -> None:
    key = keys.worker_alive(hostname)
    stopped, lock = threading.Event(), threading.Lock()

    def beat() -> None:
        while not stopped.is_set():
            with lock, contextlib.suppress(redis.RedisError):
                if not stopped.is_set():
                    client.set(key, keys.STOPPING_WORKER, px=int(ttl_s * 1000))
            stopped.wait(interval_s)

    def at_exit() -> None:
        with lock, contextlib.suppress(redis.RedisError):
            stopped.set()
            client.delete(key)

    threading.Thread(target=beat, name="vidq heartbeat (stopping)", daemon=True).start()
    atexit.register(at_exit)
