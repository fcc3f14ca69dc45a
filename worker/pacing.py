"""Submissions per second: the upstream's other limit.

The provider documents 2 submissions per second per account for this model,
besides its 2 concurrent tasks; `VIDQ_MAX_SUBMITS_PER_S` says what the
account allows (0: no limit). Without pacing, the C POSTs of a batch's start
(or of a pause's end) go out at once: those past the rate meet 429s, and
429s while fewer than C generations run would lower the effective cap
(lua/back_in_line.lua; a 429 cannot say which limit it is about). A paced
POST waits for its turn as a countdown (workers never sleep), holding the
slot it was admitted to (lua/pace_post.lua).

The rate is the lowest of the live workers' (each publishes the lowest it
sees, as C is the lowest of theirs: worker/deployment.py): two groups started
with 2/s and 10/s sent POSTs at the higher rate, met 429s, and those kept the
effective C low for the rest of the batch.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from . import keys
from .jobs import Job, JobStore, load_script

# The upstream counts a POST when it arrives, after the marker, its
# durability wait and a new TLS connection: a window is counted this much
# longer. When the rate binds, POSTs then go at rate * 1 s / (1 s + slack):
# 1.4 a second for 2 (review h33 measured 1.43).
SLACK_MS = 400


RATE_REFRESH_S = 5.0  # how stale a process's copy of the deployment's rate may be


def lowest_rate(rates: Iterable[float]) -> float:
    """The lowest of these limits (0 is none), or 0 if none limits."""
    limits = [rate for rate in rates if rate > 0]
    return min(limits) if limits else 0.0


@dataclass
class DeployedRate:
    """The POST rate a worker process keeps to: its own VIDQ_MAX_SUBMITS_PER_S,
    or the deployment's (`vidq:config` `submit_rate`) when that is lower, read
    at most every RATE_REFRESH_S."""

    own: float
    value: float = 0.0
    read_at: float = -math.inf

    def get(self, client: redis.Redis) -> float:
        if time.monotonic() - self.read_at >= RATE_REFRESH_S:
            try:
                deployed = float(client.hget(keys.CONFIG, "submit_rate") or 0.0)
            except ValueError:  # not a number: another version's, never in the way
                deployed = 0.0
            self.value, self.read_at = lowest_rate([self.own, deployed]), time.monotonic()
        return self.value


def post_window(per_second: float) -> tuple[int, float]:
    """(POSTs, per window of ms): 2/s is 2 per 1,000 ms, 0.5/s 1 per 2,000 ms;
    (0, 0) for no limit."""
    if per_second <= 0:
        return 0, 0.0
    per_window = max(1, math.floor(per_second))
    return per_window, 1000.0 * per_window / per_second


def post_wait_s(store: JobStore, job: Job, per_second: float, slots: int) -> float:
    """0 if `job`'s POST may be sent now (it is counted as sent), else how
    long to wait for its turn (never longer than `slots` POSTs in turn)."""
    per_window, window_ms = post_window(per_second)
    if not per_window:
        return 0.0
    longest_ms = (window_ms + SLACK_MS) * (slots / per_window + 2)
    script = load_script(store.redis, "pace_post")
    wait_ms = script(keys=[keys.job(job.ref), keys.POST_TURNS, keys.POSTS_SENT],
                     args=[job.ref, per_window, window_ms, longest_ms, SLACK_MS])
    return max(float(wait_ms), 0.0) / 1000
