"""Observed completions per (model, resolution), kept in Redis, and the poll
plan computed from them (worker/schedule.py).

Each shape has a list `keys.durations(model, resolution)` of samples, newest
first, at most `WINDOW`: "lo:hi" (finished after the poll at lo seconds since
submit and by the one at hi; lo 0 for a first poll), with ":late" appended
when the job was still running far past the plan's aims, ":slower" when it
ended a run of late ones (the upstream got slower). Every worker
process computes the same plan from the same list; its own copy is cached for
`CACHE_S` or `CACHE_SHARE` of its first aim, whichever is shorter (but long
enough that refits take at most `CPU_SHARE` of its time), and dropped when it
records a completion. (A copy kept 2 s is nothing against 90 s
generations, but against 5 s ones it aims a third of a second's submits with
a plan the other processes have already dropped.)
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace

import redis

from . import keys
from .contract import shape_of
from .schedule import (
    SLOWER_RUN,
    WINDOW,
    PollPlan,
    Sample,
    fitted,
    make_sample,
    mark_late,
    plan_from,
)

log = logging.getLogger(__name__)

CACHE_S = 2.0
CACHE_SHARE = 0.03
# Refits take at most this share of a process's time: a fit of 60 samples
# takes about 1 ms, but one of a batch's first completions with 200 jobs
# still running (C = 200) about 30 ms.
CPU_SHARE = 0.05
# A completion's record is judged and stored under WATCH this many times at
# most; under heavy contention it is then stored as last judged.
WATCH_TRIES = 5


def cache_s(plan: PollPlan, fit_s: float = 0.0) -> float:
    """How long a process may reuse `plan`, whose reading and fitting took
    `fit_s`, before it fits the samples again."""
    return min(CACHE_S, max(CACHE_SHARE * plan.first_s, fit_s / CPU_SHARE))


class DurationModel:
    """Observed completions per (model, resolution), kept in Redis."""

    def __init__(self, client: redis.Redis, prior_s: float):
        self.redis = client
        self.prior_s = prior_s
        self._cache: dict[str, tuple[PollPlan, float, float]] = {}  # plan, when, cost

    def plan(self, model: str, resolution: str) -> PollPlan:
        key = keys.durations(model, resolution)
        cached = self._cache.get(key)
        if cached and time.monotonic() - cached[1] < cache_s(cached[0], cached[2]):
            return cached[0]
        started = time.monotonic()
        try:
            samples = self._newest(key, WINDOW)
            current, _ = fitted(samples)
            running = self._running(model, resolution) if len(current) < WINDOW else []
        except redis.ResponseError as exc:
            # A key of the wrong type (an operator's typo, another program):
            # polls go on with the cold start rather than fail every time.
            log.warning("%s %s: poll timing unreadable (%s); polling as at a cold start",
                        model, resolution, exc)
            samples, running = [], []
        plan = plan_from(samples, self.prior_s, running)
        now = time.monotonic()
        self._cache[key] = (plan, now, now - started)
        return plan

    def _newest(self, key: str, count: int, reader=None) -> list[Sample]:
        reader = self.redis if reader is None else reader
        return [sample for raw in reader.lrange(key, 0, count - 1)
                if (sample := parse_sample(str(raw))) is not None]

    def _running(self, model: str, resolution: str) -> list[float]:
        """Ages at their last poll of this shape's jobs still generating."""
        pipe = self.redis.pipeline(transaction=False)
        for ref in self.redis.zrange(keys.SLOTS, 0, -1):
            pipe.hmget(keys.job(str(ref)), "request", "polls", "last_poll_age", "completed_at")
        ages = []
        for request, polls, age, completed_at in pipe.execute():
            try:
                if not request or not age or completed_at or int(polls or 0) < 1:
                    continue
                shape = json.loads(request)
                ours = shape_of(shape) == (model, resolution)
                if ours and 0 < float(age) < math.inf:
                    ages.append(float(age))
            except (ValueError, AttributeError):
                continue  # an unreadable job hash tells nothing; it must not fail a poll
        return ages

    def expected_s(self, model: str, resolution: str) -> float:
        """A typical generation time: the second aim, else the plan's cap."""
        plan = self.plan(model, resolution)
        return plan.second_s if plan.second_s is not None else plan.cap_s

    def typical_s(self, model: str, resolution: str) -> tuple[float, bool]:
        """A typical generation time (the second aim, just above the median)
        and whether it was learned; the prior when it was not."""
        plan = self.plan(model, resolution)
        if plan.second_s is None:
            return self.prior_s, False
        return plan.second_s, True

    def record(self, model: str, resolution: str, previous_poll_s: float,
               completed_poll_s: float, aimed_second_s: float = 0.0) -> None:
        """A completion seen at `completed_poll_s` after submit; the poll before
        it was at `previous_poll_s` (0 when this was the first poll); the plan
        that aimed the job had its second poll at `aimed_second_s` (0: none)."""
        sample = make_sample(previous_poll_s, completed_poll_s)
        if sample is None:
            return  # a clock stepped back, or no time at all: nothing to learn
        key = keys.durations(model, resolution)
        plan = self.plan(model, resolution)
        marked = sample
        with self.redis.pipeline() as pipe:
            # Watched: a wave of C jobs ends within milliseconds, and each
            # completion must be judged with the ones stored just before it.
            # Bounded: under heavy contention, stored as last judged.
            for _ in range(WATCH_TRIES):
                try:
                    pipe.watch(key)
                    marked = self._judged(pipe, key, plan, sample, aimed_second_s)
                    self._store(pipe, key, marked)
                    break
                except redis.WatchError:
                    continue
            else:
                self._store(pipe, key, marked)
        self._cache.pop(key, None)
        if marked.slower:
            log.info("%s %s: generations got slower (%d jobs in a row still running past "
                     "the poll plan's 99.9th percentile); the plan relearns from them",
                     model, resolution, SLOWER_RUN)

    @staticmethod
    def _store(pipe, key: str, sample: Sample) -> None:
        pipe.multi()
        flag = ":slower" if sample.slower else ":late" if sample.late else ""
        pipe.lpush(key, f"{sample.lo:.3f}:{sample.hi:.3f}{flag}")
        pipe.ltrim(key, 0, WINDOW - 1)
        pipe.execute()

    def _judged(self, reader, key: str, plan: PollPlan, sample: Sample,
                aimed_second_s: float) -> Sample:
        """`sample`, marked late (and slower) against the fit of what came
        before the newest run of late completions: joining the fit, each late
        one would raise the bar for the next, and a wave's jobs end fastest
        first, so the run was seldom seen whole. (Its aim is checked against
        the later of that fit's and the current plan's second polls: a job
        aimed after the run began was aimed with the run in the fit.)"""
        newest = self._newest(key, SLOWER_RUN - 1, reader)
        run = next((i for i, s in enumerate(newest) if not s.late or s.slower), len(newest))
        judge = plan
        if run:
            judge = plan_from(self._newest(key, WINDOW, reader)[run:], self.prior_s)
            if judge.second_s is not None and plan.second_s is not None:
                judge = replace(judge, second_s=max(judge.second_s, plan.second_s))
        if judge.surprise_s is None or sample.lo <= judge.surprise_s:
            return sample
        return mark_late(judge, sample, aimed_second_s, newest)


def parse_sample(raw: str) -> Sample | None:
    """A stored "lo:hi" sample, or None for anything no poll could have seen
    (unparsable, not finite, hi <= 0 or lo > hi)."""
    lo, _, rest = raw.partition(":")
    hi, _, flag = rest.partition(":")
    try:
        sample = make_sample(float(lo), float(hi or lo))
    except ValueError:
        return None
    if sample is None or flag not in ("late", "slower"):
        return sample
    return replace(sample, late=True, slower=flag == "slower")
