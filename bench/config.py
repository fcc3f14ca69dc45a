"""Sizes and clocks of one benchmark run."""
from __future__ import annotations

from dataclasses import dataclass

MEAN_GENERATION_S = 90.0  # simulated seconds, as the sandbox default
# vidq's production defaults (worker/settings.py), in simulated seconds. The
# benchmark only scales them by the clock (divides by S); it never tells vidq
# the true generation time.
PRIOR_GENERATION_S = 90.0  # VIDQ_EXPECTED_GENERATION_S
POLL_MIN_INTERVAL_S = 0.5  # VIDQ_POLL_MIN_INTERVAL_S
POLL_MAX_INTERVAL_S = 600.0  # VIDQ_POLL_MAX_INTERVAL_S
MAX_SUBMITS_PER_S = 2.0  # VIDQ_MAX_SUBMITS_PER_S (multiplied by S)
SEED_POLL_S = 10.0  # the seed example polls every 10 simulated seconds
SANDBOX_SEED = 1234
MODEL = "alibaba/wan2.1-t2v-turbo"
NAIVE_CONCURRENCY = 8
# Sequential/naive runs longer than this are cut to a subset and extrapolated.
NAIVE_BUDGET_S = 240.0


@dataclass(frozen=True)
class BenchConfig:
    n: int = 1000
    c: int = 50
    time_scale: float = 15.0
    seed_subset: int = 25
    enqueue_n: int = 100_000
    download_bytes: int = 200_000_000
    quick: bool = False
    # POSTs per second vidq is told the account allows, in simulated seconds
    # (x S); 0: no limit. The benchmark's sandbox enforces none.
    max_submits_per_s: float = MAX_SUBMITS_PER_S

    @property
    def generation_s(self) -> float:
        """T: mean wall-clock seconds of one generation."""
        return MEAN_GENERATION_S / self.time_scale

    @property
    def seed_poll_s(self) -> float:
        return SEED_POLL_S / self.time_scale

    def naive_subset(self) -> int:
        """How many prompts the naive Celery design runs within its budget."""
        per_prompt_s = (self.generation_s + self.seed_poll_s / 2 + 0.05) / NAIVE_CONCURRENCY
        fits = int(NAIVE_BUDGET_S / per_prompt_s)
        return min(self.n, max(fits, NAIVE_CONCURRENCY * 4))


def quick_config(time_scale: float) -> BenchConfig:
    return BenchConfig(n=60, c=10, time_scale=time_scale, seed_subset=10,
                       enqueue_n=10_000, download_bytes=20_000_000, quick=True)
