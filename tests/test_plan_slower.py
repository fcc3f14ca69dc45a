"""Generations that get slower mid-batch: the plan relearns from the run that
showed it instead of waiting for half a window of completions to outvote the
faster past (each of them polled in growing steps far past stale aims)."""
from __future__ import annotations

import math
import random
import statistics

import pytest
import redis
from conftest import write_prompts

from worker import keys
from worker.durations import DurationModel, parse_sample
from worker.schedule import SLOWER_RUN, Sample, mark_late, plan_from

SHAPE = ("alibaba/wan2.1-t2v-turbo", "720P")


def _learned(n: int, median: float, seed: int) -> list[Sample]:
    """n completions of ~median seconds (spread 0.1), bracketed by polls 0.5 s apart."""
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        t = median * math.exp(rng.gauss(0, 0.1))
        hi = math.ceil(t * 2) / 2
        samples.append(Sample(hi - 0.5, hi))
    return samples


def test_three_late_jobs_in_a_row_flag_a_slowdown():
    """Late: still running past the fit's 99.9th percentile, aimed by a fitted plan
    no slower than this one. Three in a row mean the upstream got slower."""
    plan = plan_from(_learned(60, 10.0, 1), prior_s=90)
    assert plan.surprise_s is not None and 12.5 < plan.surprise_s < 16.0
    late = [Sample(24.0, 25.0, late=True), Sample(22.0, 23.0, late=True)]
    assert mark_late(plan, Sample(25.0, 26.0), 9.0, late) == Sample(25.0, 26.0, True, True)
    # One of them on time, or too few of them: late, not (yet) a slowdown.
    assert mark_late(plan, Sample(25.0, 26.0), 9.0, [late[0], Sample(10.0, 10.5)]) == \
        Sample(25.0, 26.0, late=True)
    assert not mark_late(plan, Sample(25.0, 26.0), 9.0, late[:1]).slower
    assert mark_late(plan, Sample(11.0, 26.0), 9.0, late) == Sample(11.0, 26.0)  # done by 26
    # Aimed by the cold start (no fitted plan): its jobs start together and the
    # slowest of a wave end in a row; no news.
    assert mark_late(plan, Sample(25.0, 26.0), 0.0, late) == Sample(25.0, 26.0)
    cold = plan_from([], prior_s=90)
    assert cold.surprise_s is None and not mark_late(cold, Sample(500, 501), 5.0, late).late


def test_jobs_aimed_for_a_slower_upstream_that_finish_slowly_are_no_news():
    """The upstream got faster (learned at ~5 s); jobs submitted before, aimed by the
    old plan (second poll at ~10 s), finish at ~10 s: not late, no slowdown."""
    plan = plan_from(_learned(60, 5.0, 5), prior_s=90)
    stragglers = [Sample(9.5, 10.0), Sample(9.8, 10.3)]
    for sample in stragglers:
        assert mark_late(plan, sample, 10.1, stragglers) == sample


def test_after_a_slowdown_the_plan_fits_only_the_run_and_the_jobs_still_running():
    learned = _learned(57, 10.0, 2)
    run = [Sample(24.5, 25.5, slower=True), Sample(25.0, 26.0), Sample(23.5, 24.5)]
    relearned = plan_from(run + learned, prior_s=90, running=[20.0] * 8)
    unflagged = plan_from([Sample(s.lo, s.hi) for s in run] + learned, prior_s=90)
    assert unflagged.second_s is not None and unflagged.second_s < 14.0
    assert relearned.second_s is not None and 22.0 < relearned.second_s < 30.0
    assert relearned.first_s > 18.0
    # Newer completions after the run join the fit; the stale past stays out.
    newer = _learned(10, 25.0, 3)
    after = plan_from(newer + run + learned, prior_s=90)
    assert after.second_s is not None and 23.0 < after.second_s < 28.0


def test_the_completion_that_ends_the_run_is_stored_flagged(redis_url):
    """On a real Redis: a window learned at ~10 s, then jobs still running at 24 s."""
    model = DurationModel(redis.Redis.from_url(redis_url, decode_responses=True), 90.0)
    key = keys.durations(*SHAPE)
    model.redis.delete(key)
    for sample in reversed(_learned(60, 10.0, 4)):
        model.record(*SHAPE, sample.lo, sample.hi)
    assert model.plan(*SHAPE).second_s < 11.0
    for lo in (24.0, 23.5, 25.0):
        model.record(*SHAPE, lo, lo + 1.0, 9.0)
    stored = model.redis.lrange(key, 0, SLOWER_RUN)
    assert [raw.partition(":")[2].partition(":")[2] for raw in stored] == \
        ["slower", "late", "late", ""]
    assert model.plan(*SHAPE).second_s > 20.0
    assert parse_sample("24:25:slower") == Sample(24.0, 25.0, late=True, slower=True)
    assert parse_sample("24:25:late") == Sample(24.0, 25.0, late=True)
    assert parse_sample("24:25:faster") == Sample(24.0, 25.0)
    assert parse_sample("24:23:slower") is None


def test_a_wave_ending_fastest_first_is_judged_against_the_fit_before_it(redis_url):
    """A wave of jobs all just past the fit's 99.9th percentile, its fastest
    first: each late one joining the fit raised the bar for the next (the
    third was "on time", no slowdown seen, CI); judged against the fit
    before the run, the third flags it."""
    model = DurationModel(redis.Redis.from_url(redis_url, decode_responses=True), 90.0)
    key = keys.durations(*SHAPE)
    model.redis.delete(key)
    for sample in reversed(_learned(60, 10.0, 4)):
        model.record(*SHAPE, sample.lo, sample.hi)
    surprise = model.plan(*SHAPE).surprise_s
    for lo in (surprise * 1.04, surprise * 1.05, surprise * 1.06):
        model.record(*SHAPE, lo, lo + 0.5, 9.0)
    stored = model.redis.lrange(key, 0, SLOWER_RUN - 1)
    assert [raw.partition(":")[2].partition(":")[2] for raw in stored] == \
        ["slower", "late", "late"], (surprise, stored)


@pytest.mark.slow
def test_real_workers_follow_generations_that_get_six_times_slower(make_pipeline,
                                                                     make_sandbox, tmp_path):
    """Learned at ~1 s (a full window), the upstream turns ~6 s: a slowdown is flagged and the last
    jobs cost few GETs again instead of a long run of growing steps each. The
    ~1 s window is written as the record writes it: learned by real workers
    on a loaded machine, their late polls found a run of fast videos done at
    the first poll, the slow batch began in the "too late" plan (no fit to be
    late against) and relearned without a flag (a clean-clone CI run). (At
    0.5 s and 3 s it failed in two of six full runs on a loaded machine: the
    slow completions were learned, none flagged late.)"""
    pipeline = make_pipeline(make_sandbox(time_scale=15), VIDQ_EXPECTED_GENERATION_S=90)
    model = DurationModel(pipeline.store.redis, 90.0)
    for sample in reversed(_learned(60, 1.0, 5)):
        model.record(*SHAPE, sample.lo, sample.hi)
    assert model.plan(*SHAPE).second_s is not None  # a fitted plan, ~1 s
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "b.txt", [f"slow {i}" for i in range(24)]), "b")
    assert pipeline.wait_finished("b", timeout_s=180)["done"] == 24
    stored = pipeline.store.redis.lrange(keys.durations(*SHAPE), 0, -1)
    assert any(raw.endswith(":slower") for raw in stored), stored[:30]  # newest first
    jobs = [pipeline.store.get(keys.job_ref("b", i)) for i in pipeline.store.job_ids("b")]
    last = sorted(jobs, key=lambda job: job.completed_at)[-10:]
    assert statistics.median(job.polls for job in last) <= 4, [job.polls for job in last]
