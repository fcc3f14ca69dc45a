"""When to look again: poll plans learned from observed generation times,
and retry backoff.

What a poll can tell. A job found complete at poll k finished somewhere in
(poll k-1, poll k]: an interval, recorded as (lo, hi). Found complete at its
first poll, it is *censored*: it finished at or before that poll, and when
exactly is unknown. Recording the poll time as the generation time (as this
module once did) teaches the model only its own habits: with a prior of 90 s
and 9 s generations every first poll completes, and the estimate never drops.

The model, per (model, resolution), over the last `WINDOW` completions (old
ones drop out, so it follows drift; completions of recovered, retried or
resubmitted chains are never recorded):

* Cold start (fewer than `MIN_SAMPLES`): poll at 5 s, then whenever the time
  since submit has doubled (10, 20, 40 s ...), each wait at most the prior
  `VIDQ_EXPECTED_GENERATION_S`, plus one poll just before and one just after
  the prior. A right prior is then used at once; a wrong one costs two GETs
  and at most one prior's wait.
* Learned: over the last `RECENT` completions (bracketed ones at their
  midpoint, censored ones at half their poll time), the second poll goes at
  the `SECOND_Q` quantile, the first `LAG_SHARE` of the median before it,
  and later polls follow in steps of that same `LAG_SHARE`, growing after
  `FLAT_STEPS` of them. First polls that find videos done more often than
  planned pull the aims down by themselves (their halved times fall below
  the quantiles); if every recent first poll found its video done, the next
  first poll comes at half the newest poll time, then the cold doubling.
* Re-aim (worker/reaim.py): when the aims move much earlier, jobs whose first
  poll is still pending get a new one at the new aim.

The trade-off, for generation times spread like N(T, (0.1 T)^2):
a video found at the second poll waited at most `LAG_SHARE` of T; one found
at the first poll waited the first poll minus its completion, and the only
large lags are in the early tail before (first poll - 0.1 T), about 5% of
videos. Expected GETs are ~2.4 (median 2: >55% found by the second poll).
A median of two GETs and a p95 lag under 10% of T can only both hold while
the spread is at most ~0.1 T: for wider spreads the plan keeps the median at
two GETs, the steps at `LAG_SHARE` and lets the early tail wait longer. The
first poll is not aimed later to save GETs: a fast video found late holds a
slot idle, and the cap, not the GET count, bounds a batch's throughput.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import redis

from . import keys

WINDOW = 60
RECENT = 20  # completions the aims come from
TOO_LATE_RUN = 6  # newest completions all censored: the aims are far too late
MIN_SAMPLES = 5
COLD_FIRST_S = 5.0
COLD_PRIOR_AIMS = (0.95, 1.05)
SECOND_Q = 0.55  # more than half the videos are found by the second poll
LAG_SHARE = 0.08  # aimed detection lag, as a share of the median; the rest
# of a 10% budget is left for countdown and dispatch delays
FLAT_STEPS = 3  # steps of LAG_SHARE after the second poll, then growing
STEP_GROWTH = 1.25
CACHE_S = 2.0


@dataclass(frozen=True)
class PollPlan:
    """Where the polls of one job go, in seconds since its submit."""

    first_s: float
    second_s: float | None  # None: keep doubling the elapsed time (cold or too late)
    step_s: float
    cap_s: float  # longest wait between two polls of an unlearned plan
    # Cold start only: extra polls just around the prior. A right prior then
    # costs two GETs and no lag; a wrong one costs those two GETs.
    prior_aims: tuple[float, ...] = ()

    def delay(self, polls_done: int, elapsed_s: float, min_s: float, max_s: float) -> float:
        """The wait before poll number polls_done + 1."""
        if self.second_s is None:
            # Double the time since submit (never before the first aim), each
            # wait at most the cap; stop at a prior aim on the way.
            target = max(2 * elapsed_s, self.first_s) if polls_done else self.first_s
            aims = [aim for aim in self.prior_aims if elapsed_s + min_s <= aim < target]
            target = min([target, *aims])
            return _clamp(min(target - elapsed_s, self.cap_s), min_s, max_s)
        if polls_done == 0:
            return _clamp(self.first_s - elapsed_s, min_s, max_s)
        if elapsed_s < self.second_s - self.step_s / 2:
            return _clamp(self.second_s - elapsed_s, min_s, max_s)
        step = self.step_s * STEP_GROWTH ** max(polls_done - 2 - FLAT_STEPS, 0)
        return _clamp(step * _jitter(0.05), min_s, max_s)


@dataclass(frozen=True)
class Sample:
    lo: float
    hi: float

    @property
    def censored(self) -> bool:
        return self.lo <= 0.0

    @property
    def mid(self) -> float:
        return (self.lo + self.hi) / 2


def plan_from(samples: list[Sample], prior_s: float) -> PollPlan:
    """The poll plan for a shape, from its most recent samples (newest first)."""
    if len(samples) < MIN_SAMPLES:
        return PollPlan(min(COLD_FIRST_S, prior_s), None, 0.0, prior_s,
                        (COLD_PRIOR_AIMS[0] * prior_s, COLD_PRIOR_AIMS[1] * prior_s))
    run = _newest_censored_run(samples)
    if run is not None and run < MIN_SAMPLES:
        # The newest first polls all found their video done, which the plan
        # expects of about a quarter: the aims are far too late, and what
        # was learned before describes a slower upstream. Halve the earliest
        # of those poll times, then look in small steps (jobs already past
        # their first poll must not wait a doubled time) until MIN_SAMPLES
        # completions after the run can be aimed at again.
        censored = [s.hi for s in samples[:run + TOO_LATE_RUN] if s.censored]
        typical = statistics.median(censored)
        return PollPlan(min(censored) / 2, None, 0.0, LAG_SHARE * typical)
    # A censored completion finished somewhere before its poll: counted at
    # half that time, it stays below the aims, and a growing share of them
    # pulls an aim that has become too late down.
    recent = samples[:min(RECENT, run if run is not None else RECENT)]
    values = [s.hi / 2 if s.censored else s.mid for s in recent]
    cuts = statistics.quantiles(values, n=20, method="inclusive")  # 5% steps
    median, second = _quantile(cuts, 0.50), _quantile(cuts, SECOND_Q)
    step = LAG_SHARE * median
    return PollPlan(max(second - step, 0.0), second, step, second)


def _newest_censored_run(samples: list[Sample]) -> int | None:
    """Where the newest run of TOO_LATE_RUN censored completions starts (the
    number of completions after it), or None."""
    length = 0
    for index, sample in enumerate(samples):
        length = length + 1 if sample.censored else 0
        if length == TOO_LATE_RUN:
            return index - TOO_LATE_RUN + 1
    return None


class DurationModel:
    """Observed completions per (model, resolution), kept in Redis."""

    def __init__(self, client: redis.Redis, prior_s: float):
        self.redis = client
        self.prior_s = prior_s
        self._cache: dict[str, tuple[PollPlan, float]] = {}

    def plan(self, model: str, resolution: str) -> PollPlan:
        key = keys.durations(model, resolution)
        cached = self._cache.get(key)
        if cached and time.monotonic() - cached[1] < CACHE_S:
            return cached[0]
        plan = plan_from([_parse(str(raw)) for raw in self.redis.lrange(key, 0, WINDOW - 1)],
                         self.prior_s)
        self._cache[key] = (plan, time.monotonic())
        return plan

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
               completed_poll_s: float) -> None:
        """A completion seen at `completed_poll_s` after submit; the poll before
        it was at `previous_poll_s` (0 when this was the first poll)."""
        key = keys.durations(model, resolution)
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(key, f"{max(previous_poll_s, 0.0):.3f}:{completed_poll_s:.3f}")
        pipe.ltrim(key, 0, WINDOW - 1)
        pipe.execute()
        self._cache.pop(key, None)


def backoff_delay(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff with jitter: between half and all of min(cap, base * 2^(n-1))."""
    ceiling = min(cap_s, base_s * 2 ** max(attempt - 1, 0))
    return random.uniform(ceiling / 2, ceiling)


def _parse(raw: str) -> Sample:
    lo, _, hi = raw.partition(":")
    try:
        return Sample(float(lo), float(hi or lo))
    except ValueError:
        return Sample(0.0, 0.0)


def _quantile(cuts: list[float], q: float) -> float:
    # `cuts` are the 5%, 10%, ... 95% points.
    index = min(max(round(q * 20) - 1, 0), len(cuts) - 1)
    return cuts[index]


def _jitter(fraction: float) -> float:
    return random.uniform(1 - fraction, 1 + fraction)


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))
