"""The chaos suite, short variant for CI (well under 90 s): ~20 jobs, two SIGKILLed
workers, one Redis restart, moderate random faults on every POST, status GET and
download. The long variant is a command, not a test (see tests/chaos/README.md):

    python -m tests.chaos.chaos --long
"""
from __future__ import annotations

import os

import pytest

from .chaos import MODERATE, ChaosParts, run_chaos


@pytest.mark.slow
def test_chaos_short_keeps_every_promise(make_pipeline, make_sandbox, restartable_redis,
                                         tmp_path):
    seed = int(os.environ.get("VIDQ_CHAOS_SEED", "20261125"))
    parts = ChaosParts(make_sandbox, make_pipeline, restartable_redis, tmp_path)

    report = run_chaos(parts, jobs=20, seed=seed, kills=2, kill_every_s=3.0, duration_s=10.0,
                       redis_restarts=1, fault_rates=MODERATE, storm_every_s=5.0,
                       time_scale=45.0, finish_timeout_s=45.0)
    print("\n" + report.table())

    assert report.kills == 2 and report.redis_restarts == 1, "the chaos did not happen"
    assert report.duplicate_posts == 0, report.duplicates
    assert report.lost_or_stuck == [], report.lost_or_stuck
    assert report.verified == report.done and not report.unverified, report.unverified
    assert report.paid_not_downloaded == [], report.paid_not_downloaded
    assert report.done >= 1, "no video was stored"
    assert report.workers_exited == 0, (
        f"a worker exited on its own (it was replaced); logs in {report.log_dir}")
    assert not report.broken_promises()
