"""The settings every worker of one deployment must share, compared.

Workers started from different shells (a rolling upgrade, a forgotten
terminal) used to run side by side on their own values with nothing said:
C flipped with each restart and passed an operator's `vidq cap`, videos
split across two storage roots, one worker POSTed to another upstream, a
short hard limit gave up paid generations the others would have waited for.
Each starting worker now records its values under its name
(`vidq:worker_settings`); the live workers' disagreements are logged as
errors when one starts and shown by `vidq status`. C itself is the lowest
of the live workers' values: never above any of them.
"""
from __future__ import annotations

import json
import logging
import time

import redis

from . import keys
from .rows import storage_base
from .settings import Settings

log = logging.getLogger(__name__)
# Celery runs a countdown on the receiving worker's clock, set by the sender's.
CLOCK_SKEW_WARN_S = 5.0

# What must agree, by the variable that sets it.
SHARED = {
    "VIDQ_MAX_IN_FLIGHT": lambda s: s.max_in_flight,
    "VIDQ_STORAGE_URL": lambda s: storage_base(s.storage_url),
    "AIMLAPI_BASE_URL": lambda s: s.base_url.rstrip("/"),
    "VIDQ_ENDPOINT": lambda s: s.endpoint,
    "VIDQ_DEADLINE_S": lambda s: s.deadline_s,
    "VIDQ_HARD_LIMIT_S": lambda s: s.hard_limit_s,
    "VIDQ_RETENTION_S": lambda s: s.retention_s,
    "VIDQ_CREDIT_ESTIMATE": lambda s: s.credit_estimate,
    "VIDQ_CREDIT_ESTIMATES": lambda s: s.credit_estimates,
}


def publish(client: redis.Redis, worker: str, settings: Settings) -> None:
    values = {name: read(settings) for name, read in SHARED.items()}
    client.hset(keys.WORKER_SETTINGS, worker, json.dumps(values))


def live_values(client: redis.Redis, worker: str = "", prune: bool = False) -> dict[str, dict]:
    """Each live worker's shared values (`worker`, starting, counts as live);
    with `prune` (a worker starting), the records of workers whose heartbeat
    is gone are dropped."""
    recorded = client.hgetall(keys.WORKER_SETTINGS)
    names = sorted(str(name) for name in recorded)
    alive = client.mget([keys.worker_alive(name) for name in names]) if names else []
    dead = [name for name, beat in zip(names, alive, strict=True) if not beat and name != worker]
    if dead and prune:
        client.hdel(keys.WORKER_SETTINGS, *dead)
    return {name: json.loads(recorded[name]) for name in names if name not in dead}


def disagreements(values: dict[str, dict]) -> list[str]:
    """'VIDQ_MAX_IN_FLIGHT: 3 (a/1), 2 (b/2)' for each setting the live workers disagree on."""
    found = []
    for name in SHARED:
        seen: dict[str, list[str]] = {}
        for worker, theirs in sorted(values.items()):
            seen.setdefault(json.dumps(theirs.get(name)), []).append(worker)
        if len(seen) > 1:
            found.append(f"{name}: " + ", ".join(f"{json.loads(value)} ({', '.join(workers)})"
                                                  for value, workers in seen.items()))
    return found


def lowest_cap(values: dict[str, dict], own: int) -> int:
    caps = [int(theirs["VIDQ_MAX_IN_FLIGHT"]) for theirs in values.values()
            if isinstance(theirs.get("VIDQ_MAX_IN_FLIGHT"), int)]
    return min([own, *caps])


def warn_of_clock_skew(client: redis.Redis) -> float:
    """This machine's clock against Redis's (leases, spend days and retention
    use Redis's; Celery's countdowns use each worker's own): a worker an hour
    off sends its polls an hour late or early, and the reconciler re-sends
    them after the step grace. Returns the skew in seconds."""
    seconds, micros = client.time()
    skew = time.time() - (seconds + micros / 1e6)
    if abs(skew) > CLOCK_SKEW_WARN_S:
        log.error("this machine's clock is %+.0f s off Redis's: countdown polls run on each "
                  "worker's clock, so they come late or early and are re-sent; sync the "
                  "clocks (NTP)", skew)
    return skew
