"""How generation times are spread, estimated from what polls can tell.

A completion seen at poll k finished somewhere in (poll k-1, poll k]; seen at
its first poll, somewhere in (0, poll 1]; a job still running after a poll at
e will finish somewhere in (e, inf). Nothing more precise is ever known, so
the fit works on those intervals, never on poll times taken as durations.

Generation times are modelled as log-normal: positive, and skewed to the right
as the times of a loaded service are. The parameters of log(time) are fitted by
maximum likelihood with EM: each round replaces every interval by the moments of
the current normal truncated to it, then takes their mean and spread. Sixty
intervals converge in a few milliseconds.
"""
from __future__ import annotations

import math
import statistics

ROUNDS = 60
TOLERANCE = 1e-5


def fit_lognormal(intervals: list[tuple[float, float]], min_sigma: float,
                  prior_sigma: float = 0.0, prior_weight: float = 0.0) -> tuple[float, float]:
    """(mu, sigma) of log generation times, from (lo, hi] intervals in seconds
    (lo <= 0: finished at or before hi; hi infinite: still running at lo);
    sigma is at least min_sigma, and pulled towards prior_sigma as if
    prior_weight intervals had that spread."""
    # (0, inf) says nothing; every other interval narrows the fit.
    bounds = [(math.log(lo) if lo > 0 else -math.inf, math.log(max(hi, 1e-6)))
              for lo, hi in intervals if lo > 0 or math.isfinite(hi)]
    mids = [_inside(lo, hi) for lo, hi in bounds]
    mu, sigma = statistics.fmean(mids), max(statistics.pstdev(mids), min_sigma)
    for _ in range(ROUNDS):
        moments = [truncated_moments(lo, hi, mu, sigma) for lo, hi in bounds]
        new_mu = statistics.fmean(m for m, _ in moments)
        second = statistics.fmean(s for _, s in moments)
        spread = len(bounds) * max(second - new_mu ** 2, 0.0) + prior_weight * prior_sigma ** 2
        new_sigma = max(math.sqrt(spread / (len(bounds) + prior_weight)), min_sigma)
        converged = abs(new_mu - mu) < TOLERANCE and abs(new_sigma - sigma) < TOLERANCE
        mu, sigma = new_mu, new_sigma
        if converged:
            break
    return mu, sigma


def truncated_moments(lo: float, hi: float, mu: float, sigma: float) -> tuple[float, float]:
    """E[y] and E[y^2] of y ~ N(mu, sigma^2) given lo < y <= hi."""
    alpha, beta = (lo - mu) / sigma, (hi - mu) / sigma
    mass = normal_cdf(beta) - normal_cdf(alpha)
    if mass < 1e-12:  # far out in a tail: the interval itself is the best guess
        y = _inside(lo, hi)
        return y, y * y
    pdf_lo, pdf_hi = normal_pdf(alpha), normal_pdf(beta)
    shift = (pdf_lo - pdf_hi) / mass
    mean = mu + sigma * shift
    edge = (_times(alpha, pdf_lo) - _times(beta, pdf_hi)) / mass
    variance = sigma ** 2 * max(1 + edge - shift ** 2, 0.0)
    return mean, variance + mean ** 2


def _inside(lo: float, hi: float) -> float:
    """A point of (lo, hi] to start from: its middle, or its finite end."""
    if math.isinf(lo):
        return hi
    return lo if math.isinf(hi) else (lo + hi) / 2


def _times(z: float, pdf: float) -> float:
    return 0.0 if math.isinf(z) else z * pdf


def normal_cdf(z: float) -> float:
    """P(Z <= z) for a standard normal Z."""
    return 0.5 * math.erfc(-z / math.sqrt(2))


def normal_pdf(z: float) -> float:
    """The standard normal density at z (0 at either infinity)."""
    return 0.0 if math.isinf(z) else math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
