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
resubmitted chains, of jobs past their deadline and those found by a first
poll held back far past its aim are never recorded: their delays are vidq's):

* Cold start (fewer than `MIN_SAMPLES`): poll at 5 s, then whenever the time
  since submit has doubled (10, 20, 40 s ...), each wait at most the prior
  `VIDQ_EXPECTED_GENERATION_S`, plus one poll just before and one just after
  the prior. A right prior is then used at once; a wrong one costs two GETs
  and at most one prior's wait.
* Learned: a log-normal fitted to the intervals by maximum likelihood
  (worker/fit.py), censored ones included as what they are. With few samples
  its spread leans on a wide `SPREAD_PRIOR`. The second poll goes just above
  the median (`Z_SECOND` spreads, plus a margin for the estimate's own error),
  the first `FIRST_BEFORE` spreads before it, and later polls follow in steps
  of `STEP_SPREADS` spreads (between 2% and `LAG_SHARE` of the median),
  growing once a job is `FLAT_STEPS` steps past the second aim.
* Too late: if the newest `TOO_LATE_RUN` completions were all found at their
  first poll (planned: about a fifth), what was learned describes a slower
  upstream. It is dropped, the next first poll comes at half the median of
  those poll times, then in small steps, until `MIN_SAMPLES` completions can
  be fitted again. (The median, not the earliest: a job re-aimed late is
  polled at whatever age it had, and one found done early must not halve
  the aim again on its own; most of the newest must.)
* Slower: a completion is *late* if its job was still running when the fit
  had 99.9% of videos done, and was aimed by a fitted plan no slower than
  the current one (a job planned for slower times, submitted before the
  upstream got faster, is no news; nor is one of the cold start, whose jobs
  start together and end in waves, their slowest last). If the newest `SLOWER_RUN`
  completions are all late, the upstream got slower, and the window mostly
  describes its faster past, which would take half a window of completions
  to outvote, each of them polled in growing steps far past stale aims. The
  completion that ends such a run is stored flagged; the fit then uses only
  that run and what came after it (with the jobs still running), until the
  flag leaves the window.
* Re-aim (worker/reaim.py): when the aims move much earlier, jobs whose first
  poll is still pending get a new one at the new aim.

The trade-off. A median of two GETs needs the second poll after the median.
A video found at the second poll then waited at most the gap between the two
polls, one found later at most one step; the lags that count are those of
the early tail, found at the first poll long after it finished. In spreads
(standard deviations), the plan above (second aim 0.16 fitted spreads past
the median with 60 samples, the first 0.9 before it) puts the 95th
percentile of the lag at 0.91 when the spread is known exactly: 9% of T for
the sandbox's spread of 10%. No plan that finds half the videos by its
second poll does better than 0.82, and none has a mean lag under 0.23,
however many GETs follow. The aims sit a little past the median so that the
median stays at two GETs although the cold start's jobs and the estimate's
error take some of that half; the estimate's error adds to the lag.
`python -m bench.plan_sim` replays batches against this code in simulated
time. Lower lags need more GETs per video.
The first poll is not aimed later to save GETs: a fast video found late
holds a slot idle, and the cap, not the GET count, bounds a batch's
throughput.
"""
from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .fit import fit_lognormal

WINDOW = 60  # completions fitted
TOO_LATE_RUN = 8  # newest completions all censored: the aims are far too late
# (about a fifth of first polls find the video done as planned: eight in a row
# by chance, 0.23^8, is once in ~130,000 completions; six in a row happened by
# chance in simulated batches)
SLOWER_RUN = 3  # newest completions all past the fit's 99.9th percentile: slower
SLOWER_Z = 3.09  # (by chance, for independent completions: 0.001^3; the slowest
# of a wave of C jobs submitted together do finish in a row, and C = 200 puts
# three past the 99th percentile at the end of a wave one time in three)
MIN_SAMPLES = 5
LONGEST_S = 1e6  # no generation is polled for 11 days; no stored sample is longer
COLD_FIRST_S = 5.0
COLD_PRIOR_AIMS = (0.95, 1.05)
# Aims, in spreads (standard deviations of log time) from the median.
Z_SECOND = 0.10  # the second poll finds just over half the videos done...
SE_MARGIN = 0.5  # ...plus half the estimate's standard error, 1/sqrt(n) spreads
FIRST_BEFORE = 0.9  # the first poll, before the second
STEP_SPREADS = 0.7  # later polls, apart
MIN_SPREAD = 0.05  # below it, countdown and dispatch jitter dominate anyway
SPREAD_PRIOR, PRIOR_WEIGHT = 0.15, 5  # a wide spread, worth 5 samples
LAG_SHARE = 0.08  # largest step, as a share of the median; the rest of a 10%
# budget is left for countdown and dispatch delays
MIN_STEP_SHARE = 0.02  # smallest step, as a share of the median
FLAT_STEPS = 3  # steps past the second aim before they grow
STEP_GROWTH = 1.25
MAX_GROWTHS = 100  # 1.25^100: far past any max_s, short of a float overflow
RUNNING_BEYOND = 2.0  # a running job counts as "still running at" most this
# many times the longest completion: stuck jobs must not stretch the fit


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
    # Learned plans only: a job still running at this age is a 1-in-1,000
    # surprise to the fit (its 99.9th percentile).
    surprise_s: float | None = None

    def delay(self, polls_done: int, elapsed_s: float, min_s: float, max_s: float) -> float:
        """The wait before poll number polls_done + 1."""
        if self.second_s is None:
            # Double the time since submit (never before the first aim), each
            # wait at most the cap; stop at a prior aim on the way.
            target = max(2 * elapsed_s, self.first_s) if polls_done else self.first_s
            aims = [aim for aim in self.prior_aims if elapsed_s + min_s <= aim < target]
            target = min([target, *aims])
            # A too-late plan's small cap grows with the job's age: a job far
            # older than the plan expects must not be polled in small steps
            # all night. (The cold start's cap is the prior, large already.)
            grows = polls_done and not self.prior_aims
            cap = max(self.cap_s, LAG_SHARE * elapsed_s) if grows else self.cap_s
            return _clamp(min(target - elapsed_s, cap), min_s, max_s)
        if polls_done == 0:
            return _clamp(self.first_s - elapsed_s, min_s, max_s)
        if elapsed_s < self.second_s - self.step_s / 2:
            return _clamp(self.second_s - elapsed_s, min_s, max_s)
        # Grows with how far past the second aim the job is, not with its poll
        # count: a job polled in fine steps while the plan was relearned must
        # not get a huge step when a learned plan returns.
        steps_past = (elapsed_s - self.second_s) / self.step_s if self.step_s else 0.0
        step = self.step_s * STEP_GROWTH ** min(max(steps_past - FLAT_STEPS, 0.0), MAX_GROWTHS)
        return _clamp(step * _jitter(0.05), min_s, max_s)


@dataclass(frozen=True)
class Sample:
    lo: float
    hi: float
    late: bool = False  # still running past the surprise age of the plan that aimed it
    # It ended a run of SLOWER_RUN late ones: older samples (before the run)
    # describe a faster upstream.
    slower: bool = False

    @property
    def censored(self) -> bool:
        return self.lo <= 0.0


def plan_from(samples: list[Sample], prior_s: float,
              running: Sequence[float] = ()) -> PollPlan:
    """The poll plan for a shape, from its most recent samples (newest first)
    and, while there are fewer than WINDOW, the ages at their last poll of the
    jobs still running."""
    samples, slower = fitted(samples)
    if len(samples) < MIN_SAMPLES and not slower:
        return PollPlan(min(COLD_FIRST_S, prior_s), None, 0.0, prior_s,
                        (COLD_PRIOR_AIMS[0] * prior_s, COLD_PRIOR_AIMS[1] * prior_s))
    run = _newest_censored_run(samples)
    if run is not None and run < MIN_SAMPLES:
        # The newest first polls all found their video done, which the plan
        # expects of about a fifth: the aims are far too late, and what was
        # learned before describes a slower upstream. Halve the median of
        # those poll times, then look in small steps (jobs already past their
        # first poll must not wait a doubled time) until MIN_SAMPLES
        # completions after the run can be fitted.
        first = statistics.median(s.hi for s in samples[:run + TOO_LATE_RUN] if s.censored) / 2
        return PollPlan(first, None, 0.0, LAG_SHARE * first)
    recent = samples[:run] if run is not None else samples
    n = len(recent)
    intervals = [(s.lo, s.hi) for s in recent]
    if run is None and n < WINDOW and running:
        # The first completions of a batch are its fastest jobs: fitted
        # alone, they aim the next polls too early. Jobs still running after
        # a poll say how long the others take. (Not once the window is full:
        # completions are then a fair sample, and running jobs, the longest
        # ones, would bias it. Not after a too-late run: those still running
        # may be from the slower past.)
        longest = max(s.hi for s in recent)
        intervals += [(min(age, RUNNING_BEYOND * longest), math.inf) for age in running]
    # A few samples say little about the spread: lean on a wide one, worth
    # PRIOR_WEIGHT completions (jobs still running tell little of it), until
    # there are more. Inside the fit, not after it: a batch's first
    # completions alone ("8 of 50 done by 80 s") fit any spread, each with its
    # own median, and which one the fit stopped at depended on its start.
    mu, sigma = fit_lognormal(intervals, MIN_SPREAD, SPREAD_PRIOR,
                              PRIOR_WEIGHT * len(intervals) / n)
    return aimed_plan(mu, sigma, Z_SECOND + SE_MARGIN / math.sqrt(n))


def aimed_plan(mu: float, sigma: float, z_second: float) -> PollPlan:
    """The learned plan for log times ~ N(mu, sigma^2), its second poll
    `z_second` spreads past the median."""
    second = math.exp(mu + z_second * sigma)
    step = math.exp(mu) * min(max(STEP_SPREADS * sigma, MIN_STEP_SHARE), LAG_SHARE)
    return PollPlan(math.exp(mu + (z_second - FIRST_BEFORE) * sigma), second, step, second,
                    surprise_s=math.exp(mu + SLOWER_Z * sigma))


def fitted(samples: list[Sample]) -> tuple[list[Sample], bool]:
    """The samples (newest first) that describe the upstream as it is now, and
    whether a slowdown cut off the older ones."""
    flag = next((index for index, sample in enumerate(samples) if sample.slower), None)
    if flag is None:
        return samples, False
    return samples[:flag + SLOWER_RUN], True


def mark_late(plan: PollPlan, sample: Sample, aimed_second_s: float,
              newest: Sequence[Sample]) -> Sample:
    """`sample` marked `late` if its job was still running past the plan's
    surprise age and was aimed by a fitted plan whose second poll
    (`aimed_second_s`; 0: none, a cold start or too-late plan) was no later
    than this plan's; marked `slower` too if the newest stored samples before
    it make a run of SLOWER_RUN late ones."""
    surprise, second = plan.surprise_s, plan.second_s
    if surprise is None or second is None or sample.lo <= surprise:
        return sample
    if not 0 < aimed_second_s <= second:
        return sample
    before = newest[:SLOWER_RUN - 1]
    slower = len(before) == SLOWER_RUN - 1 and all(s.late for s in before)
    return replace(sample, late=True, slower=slower)


def _newest_censored_run(samples: list[Sample]) -> int | None:
    """Where the newest run of TOO_LATE_RUN censored completions starts (the
    number of completions after it), or None."""
    length = 0
    for index, sample in enumerate(samples):
        length = length + 1 if sample.censored else 0
        if length == TOO_LATE_RUN:
            return index - TOO_LATE_RUN + 1
    return None


def backoff_delay(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff with jitter: between half and all of min(cap, base * 2^(n-1))."""
    ceiling = min(cap_s, base_s * 2 ** max(attempt - 1, 0))
    return random.uniform(ceiling / 2, ceiling)


def make_sample(lo: float, hi: float) -> Sample | None:
    """The sample (lo, hi], or None if no poll could have seen it (a value
    past LONGEST_S is a corrupt one: the fit's exp() would overflow)."""
    lo = max(lo, 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= 0 or lo > hi or hi > LONGEST_S:
        return None
    return Sample(lo, hi)


def _jitter(fraction: float) -> float:
    return random.uniform(1 - fraction, 1 + fraction)


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))
