"""401 (the key) and 403 (the credits) answered to POSTs, in a row: the
account is refused, not the prompts. Real workers, Redis and the sandbox."""
from __future__ import annotations

import subprocess
import time

import pytest
from conftest import wait_until, write_prompts

from worker import keys
from worker.keys import job_ref


@pytest.mark.slow
def test_credits_running_out_pause_submits_instead_of_failing_the_night(
        make_pipeline, make_sandbox, tmp_path):
    """Five POSTs in a row answered 403: the first two fail their jobs (one
    refusal alone may be about its prompt), the third pauses submits for every
    worker, says why in `vidq status`, and is tried again after the pause
    (VIDQ_BACKOFF_CAP_S), first in line, until the credits are back. Without
    the pause, the five would fail five prompts, and at 2 a.m. the whole night's."""
    sandbox = make_sandbox()
    pipeline = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT=1, VIDQ_BACKOFF_CAP_S=3)
    pipeline.faults(submit=[403] * 5)
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"night {i}" for i in range(6)]), "n")

    wait_until(lambda: pipeline.store.redis.exists(keys.PAUSE_SUBMIT_WHY), 60,
               "submits paused for the account")

    def status_while_paused():
        # Asked again if a slow start missed a 3 s pause; three of them come.
        shown = subprocess.run(["vidq", "status", "n"], env=pipeline.env, capture_output=True,
                               text=True, timeout=60)
        return "submits paused" in shown.stdout and shown

    status = wait_until(status_while_paused, 30, "`vidq status` during a pause", every_s=0)
    counts = pipeline.wait_finished("n", timeout_s=120)

    assert "the upstream refused the account (HTTP 403: Insufficient credits)" in status.stdout
    assert "check the API key and the credits" in status.stdout
    assert "ETA unknown (submits paused: the upstream refused the account)" in status.stdout
    assert (counts["done"], counts["failed"]) == (4, 2)
    jobs = [pipeline.store.get(job_ref("n", i)) for i in pipeline.store.job_ids("n")]
    reasons = [job.last_error for job in jobs if job.state == "failed"]
    assert all("HTTP 403" in reason for reason in reasons), reasons
    assert sandbox.stats()["submissions"] == 4  # a refused POST created nothing
    # Accepted POSTs reset the count: one later refusal fails its own job only.
    assert not pipeline.store.redis.exists(keys.ACCOUNT_REFUSALS)


def test_one_refused_prompt_between_accepted_ones_fails_alone(make_pipeline, make_sandbox,
                                                               tmp_path):
    """A 403 that is not in a row pauses nothing: its job fails with the
    upstream's words and the batch goes on at once."""
    sandbox = make_sandbox()
    pipeline = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT=1, VIDQ_BACKOFF_CAP_S=60)
    pipeline.faults(submit=[403, 403])
    pipeline.start_workers()
    started = time.monotonic()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"day {i}" for i in range(3)]), "d")

    counts = pipeline.wait_finished("d", timeout_s=60)

    assert (counts["done"], counts["failed"]) == (1, 2)
    assert time.monotonic() - started < 45  # no 60 s pause
    assert not pipeline.store.redis.exists(keys.PAUSE_SUBMIT)


@pytest.mark.slow
def test_rate_limit_429s_between_refusals_do_not_restart_the_count(make_pipeline, make_sandbox,
                                                                   tmp_path):
    """The credits are gone and every POST is refused 403, but now and then a 429
    comes first (the rate limiter in front). A 429 says nothing of the account:
    still two prompts fail, then submits pause. (Counted afresh after each 429,
    the eight prompts failed six.)"""
    sandbox = make_sandbox()
    pipeline = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT=1, VIDQ_BACKOFF_CAP_S=2)
    pipeline.faults(submit=[403, 403, 429, 403, 403, 429, 403, 403, 429])
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"night {i}" for i in range(8)]), "n")

    counts = pipeline.wait_finished("n", timeout_s=120)

    jobs = [pipeline.store.get(job_ref("n", i)) for i in pipeline.store.job_ids("n")]
    refused = [job.ref for job in jobs if job.state == "failed" and "HTTP 403" in job.last_error]
    assert len(refused) == 2, refused
    assert (counts["done"], counts["failed"]) == (6, 2)
    assert sandbox.stats()["submissions"] == 6
