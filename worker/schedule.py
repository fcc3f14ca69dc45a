"""When to look again: adaptive poll timing and retry backoff.

Poll times are aimed at quantiles of the generation time learned for the
model and resolution (its median m, kept per shape in a short Redis list):
the first GET a little before m, the second a little after it, so most videos
need one or two; then short steps of a twentieth of m, growing by a quarter
each time, keep the lag between completion and its detection small.
"""
from __future__ import annotations

import random
import statistics
import time

import redis

from . import keys

SAMPLES_KEPT = 200
MIN_SAMPLES = 5
# Aim points as fractions of the median: with the ~10% spread seen so far
# these are about the 30th and 60th percentiles.
FIRST_AIM = 0.95
SECOND_AIM = 1.03
# Share of the median between polls after the second one, and its growth.
STEP_FRACTION = 0.05
STEP_GROWTH = 1.25
# A video already complete at the first poll finished at some unknown time
# before it. The first poll comes before the median, so such a sample lies
# below the median whatever it is; recording a little less than the poll time
# pulls an estimate that is too high down quickly.
EARLY_SHRINK = 0.85
CACHE_S = 5.0


class DurationModel:
    """Learned generation times per (model, resolution)."""

    def __init__(self, client: redis.Redis, default_s: float):
        self.redis = client
        self.default_s = default_s
        self._cache: dict[str, tuple[float, float]] = {}

    def expected_s(self, model: str, resolution: str) -> float:
        key = keys.durations(model, resolution)
        cached = self._cache.get(key)
        if cached and time.monotonic() - cached[1] < CACHE_S:
            return cached[0]
        samples = [float(x) for x in self.redis.lrange(key, 0, SAMPLES_KEPT - 1)]
        value = statistics.median(samples) if len(samples) >= MIN_SAMPLES else self.default_s
        self._cache[key] = (value, time.monotonic())
        return value

    def record(self, model: str, resolution: str, elapsed_s: float, polls: int,
               last_interval_s: float) -> None:
        if polls <= 1:
            sample = elapsed_s * EARLY_SHRINK
        else:
            sample = elapsed_s - last_interval_s / 2
        key = keys.durations(model, resolution)
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(key, repr(max(sample, 0.0)))
        pipe.ltrim(key, 0, SAMPLES_KEPT - 1)
        pipe.execute()


def first_poll_delay(expected_s: float, min_s: float, max_s: float) -> float:
    # Countdowns stay under max_s (and so under the visibility timeout); a long
    # generation simply gets a few more waits before its first GET.
    return _clamp(FIRST_AIM * expected_s * _jitter(0.02), min_s, max_s)


def next_poll_delay(expected_s: float, polls_done: int, min_s: float, max_s: float,
                    elapsed_s: float) -> float:
    """The wait before poll number polls_done + 1."""
    slack = STEP_FRACTION * expected_s / 2  # a poll just short of an aim (jitter) counts
    for aim in (FIRST_AIM * expected_s, SECOND_AIM * expected_s):
        if elapsed_s < aim - slack:
            return _clamp(aim - elapsed_s, min_s, max_s)
    step = expected_s * STEP_FRACTION * STEP_GROWTH ** max(polls_done - 2, 0)
    return _clamp(step * _jitter(0.1), min_s, max_s)


def backoff_delay(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff with jitter: between half and all of min(cap, base * 2^(n-1))."""
    ceiling = min(cap_s, base_s * 2 ** max(attempt - 1, 0))
    return random.uniform(ceiling / 2, ceiling)


def _jitter(fraction: float) -> float:
    return random.uniform(1 - fraction, 1 + fraction)


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))
