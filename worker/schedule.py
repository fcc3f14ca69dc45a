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
* Too late: if nearly all (`TOO_LATE_SHARE`) of the last `RECENT`
  completions were censored, first polls are far too late. The next first
  poll comes at half the newest censored poll time, then the cold-start
  doubling, until completions are bracketed by two polls again.
* Learned: over the last `RECENT` completions, bracketed ones counted at
  their midpoint and censored ones at half their poll time (which pulls an
  aim that has become too late down quickly), the first poll at the `FIRST_Q`
  quantile and the second at `SECOND_Q`; then steps of an eighth of the 10-90%
  spread of recent bracketed completions, growing by a quarter.

The trade-off: a first poll at q30 finds ~30% complete (each waited at most
to q30), the second at q65 catches the next ~35%, so the median video needs
2 GETs; a later step is ~1/8 of the spread, so the lag after the second poll
stays a few percent of T. The 5% worst lags (videos done well before q30, or
just after q30) are ~10-20% of T: a 2-GET median cannot also bracket every
video tightly. Feedback comes C jobs late (C are in flight), which is why the
estimate uses only recent completions and reacts to censoring strongly. Aiming the first
poll later would save GETs but lengthen the lag of every fast video, which
holds a slot idle: the cap, not the GET count, bounds a batch's throughput.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import redis

from . import keys

WINDOW = 60
QUANTILE_WINDOW = 30  # bracketed completions the quantiles come from
RECENT = 12  # completions that decide whether first polls are too late
NEWEST = 5
MIN_SAMPLES = 5
COLD_FIRST_S = 5.0
COLD_PRIOR_AIMS = (0.95, 1.05)
FIRST_Q, SECOND_Q = 0.30, 0.65
STEP_SHARE_OF_SPREAD = 1 / 8
STEP_GROWTH = 1.25
TOO_LATE_SHARE = 0.8
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
        step = self.step_s * STEP_GROWTH ** max(polls_done - 2, 0)
        return _clamp(step * _jitter(0.1), min_s, max_s)


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
    recent = samples[:RECENT]
    censored = [s.hi for s in recent if s.censored]
    if len(censored) > TOO_LATE_SHARE * len(recent):
        # Halve the newest censored poll time: each round of first polls that
        # still finds videos done moves the next round twice as early.
        first = min(s.hi for s in samples[:NEWEST] if s.censored) / 2 \
            if any(s.censored for s in samples[:NEWEST]) else min(censored) / 2
        return PollPlan(first, None, 0.0, max(first, statistics.median(s.hi for s in recent)))
    # A censored completion finished somewhere before its poll: count it at
    # half that time, which pulls an aim that has become too late down fast.
    values = [s.hi / 2 if s.censored else s.mid for s in recent]
    cuts = statistics.quantiles(values, n=20, method="inclusive")  # 5% steps
    first, second = _quantile(cuts, FIRST_Q), _quantile(cuts, SECOND_Q)
    # The step after the second poll: a share of the spread of bracketed
    # completions (censored guesses would only widen it).
    bracketed = [s.mid for s in samples[:QUANTILE_WINDOW] if not s.censored]
    spread = _spread(bracketed) if len(bracketed) >= 3 else 0.2 * second
    step = max(spread * STEP_SHARE_OF_SPREAD, 0.01 * second)
    return PollPlan(first, max(second, first), step, second)


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


def _spread(values: list[float]) -> float:
    cuts = statistics.quantiles(values, n=10, method="inclusive")
    return cuts[-1] - cuts[0]


def _quantile(cuts: list[float], q: float) -> float:
    # `cuts` are the 5%, 10%, ... 95% points.
    index = min(max(round(q * 20) - 1, 0), len(cuts) - 1)
    return cuts[index]


def _jitter(fraction: float) -> float:
    return random.uniform(1 - fraction, 1 + fraction)


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))
