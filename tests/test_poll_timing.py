"""Poll timing that learns any generation time, and one shared pause on 429.

The unit tests pin the plan's rules; the rest run real workers against the
sandbox with the default prior (90 s) while generations take about 1 s: the
system is never told the true time.
"""
from __future__ import annotations

import json
import math
import random
import statistics
import time

import pytest
import redis
from conftest import learned_then, write_prompts

from worker import keys
from worker.durations import DurationModel
from worker.fit import fit_lognormal
from worker.schedule import LAG_SHARE, TOO_LATE_RUN, PollPlan, Sample, plan_from


def _lags(pipeline, batch: str) -> list[float]:
    """Detection lag per job, in completion order: vidq's completed_at minus the
    sandbox's completes_at."""
    completes = {e["id"]: e["completes_at"] for e in pipeline.ledger()}
    jobs = [pipeline.store.get(keys.job_ref(batch, i)) for i in pipeline.store.job_ids(batch)]
    done = sorted((j for j in jobs if j.completed_at), key=lambda j: j.completed_at)
    return [j.completed_at - completes[j.generation_id] for j in done]


def test_cold_start_polls_at_5_s_then_doubles_capped_by_the_prior():
    """5, 10, 20, 40, 80 s, one poll just before and one just after the prior (90 s),
    then waits of at most the prior."""
    plan = plan_from([], prior_s=90)
    assert plan == PollPlan(5.0, None, 0.0, 90, (85.5, 94.5))
    times, elapsed = [], 0.0
    for polls in range(8):
        elapsed += plan.delay(polls, elapsed, 0.1, 120)
        times.append(round(elapsed, 1))
    assert times == [5.0, 10.0, 20.0, 40.0, 80.0, 85.5, 94.5, 184.5]


def _observed(times: list[float], polls: list[float]) -> list[Sample]:
    """What polls at these times since submit tell of jobs that took `times`."""
    samples = []
    for t in times:
        found = next(i for i, poll in enumerate(polls) if poll >= t)
        samples.append(Sample(polls[found - 1] if found else 0.0, polls[found]))
    return samples


def _lognormal(n: int, median: float, sigma: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [median * math.exp(rng.gauss(0, sigma)) for _ in range(n)]


def test_the_fit_recovers_median_and_spread_from_poll_intervals():
    """Only intervals are known, most of them censored at the first poll: the fit
    still finds the median within 3% and the spread within 25%."""
    polls = [9.0 + 0.5 * k for k in range(40)]
    for seed, median in enumerate((8.0, 10.0, 12.0)):
        samples = _observed(_lognormal(300, median, 0.1, seed), polls)
        mu, sigma = fit_lognormal([(s.lo, s.hi) for s in samples], 0.01)
        assert abs(math.exp(mu) / median - 1) < 0.03, (median, math.exp(mu))
        assert abs(sigma / 0.1 - 1) < 0.25, (median, sigma)


def test_a_learned_plan_puts_the_second_poll_just_past_the_median():
    """Sixty completions of ~10 s: more than half are found by the second poll, the
    first comes about a spread before it, later polls in steps of 2-8% of T."""
    samples = _observed(_lognormal(60, 10.0, 0.1, 7), [8.0 + 0.25 * k for k in range(60)])
    plan = plan_from(samples, prior_s=90)
    assert plan.second_s is not None
    assert 10.0 < plan.second_s < 10.6 and 8.5 < plan.first_s < plan.second_s - 0.5
    assert 0.2 <= plan.step_s <= 0.8
    times, elapsed = [], 0.0
    for polls in range(6):
        elapsed += plan.delay(polls, elapsed, 0.1, 600)
        times.append(elapsed)
    gaps = [b - a for a, b in zip(times[1:], times[2:], strict=False)]
    assert all(0.9 * plan.step_s <= gap <= 1.1 * plan.step_s for gap in gaps), times


def test_steps_grow_with_time_past_the_second_aim_not_with_the_poll_count():
    """A job polled 30 times in fine steps while the plan was relearned gets the
    plan's step, not one grown 30 times."""
    plan = PollPlan(9.0, 10.0, 0.5, 10.0)
    assert 0.45 <= plan.delay(30, 10.6, 0.1, 600) <= 0.55
    assert plan.delay(30, 10.0 + 0.5 * 10, 0.1, 600) > 0.5 * 1.25 ** 6


def test_first_polls_that_keep_finding_videos_done_move_earlier_by_half():
    """Eight first polls in a row found the video done (planned: about a fifth): what
    was learned before is dropped, the next first poll comes at half the poll time and
    later ones in small steps, until five completions after the run can be fitted."""
    learned = _observed(_lognormal(40, 10.0, 0.1, 3), [8.0 + 0.5 * k for k in range(20)])
    censored = [Sample(0.0, 9.0)] * TOO_LATE_RUN
    plan = plan_from(censored + learned, prior_s=90)
    assert plan == PollPlan(4.5, None, 0.0, LAG_SHARE * 4.5)
    plan = plan_from([Sample(0.0, 4.5)] * 5 + censored + learned, prior_s=90)
    assert plan.first_s == 2.25 and plan.second_s is None  # done even at 4.5 s: halve again
    after = [Sample(t - 0.2, t + 0.2) for t in (2.0, 2.2, 2.4, 2.6, 2.8)]
    plan = plan_from(after + censored + learned, prior_s=90)
    assert plan.second_s is not None and plan.second_s < 3.0  # the slow past is gone


def test_a_few_jobs_found_done_at_odd_ages_do_not_halve_the_aim_again():
    """Generation times halved to ~45 s under a plan polling first at ~82 s: eight
    first polls in a row found the video done, so the next first polls go to 41 s.
    Jobs re-aimed then are polled at whatever age they had (72, 55, 43 s) and found
    done too; that says nothing of polls at 41 s, which stay (the earliest-poll rule
    halved them to 21 s, and those jobs then took up to 21 GETs each)."""
    learned = _observed(_lognormal(40, 90.0, 0.1, 3), [80.0 + 2 * k for k in range(20)])
    run = [Sample(0.0, t) for t in (82.9, 82.5, 82.2, 82.3, 82.7, 82.6, 82.2, 82.2)]
    assert plan_from(run + learned, prior_s=90).first_s == pytest.approx(41.2, abs=0.1)
    reaimed = [Sample(0.0, t) for t in (42.8, 54.9, 72.4)]
    plan = plan_from(reaimed + run + learned, prior_s=90)
    assert plan.second_s is None and plan.first_s == pytest.approx(41.2, abs=0.1)


def test_first_polls_finding_more_videos_done_than_planned_pull_the_aims_down():
    """The upstream got faster: 12 of the last 20 first polls (at 9.2 s, planned to find
    about a fifth done) found the video done. The fit takes them for what they say,
    finished before 9.2 s, and both aims move below the old first poll."""
    done, bracketed = Sample(0.0, 9.2), [Sample(t - 0.4, t + 0.4) for t in (9.6, 10, 10.4, 10.8)]
    plan = plan_from([done, done, bracketed[0], done, done, bracketed[1]] * 3
                     + [done, done, bracketed[2], bracketed[3]], prior_s=90)
    assert plan.second_s is not None and plan.first_s < plan.second_s < 9.2


def test_jobs_still_running_keep_the_first_completions_from_aiming_too_early():
    """The first five completions of a batch are its fastest (~8 s of ~10 s): with
    the forty jobs still running past 9 s counted, the second aim is past 9 s."""
    fastest = [Sample(t - 0.25, t + 0.25) for t in (7.5, 7.8, 8.0, 8.2, 8.5)]
    alone = plan_from(fastest, prior_s=90)
    with_running = plan_from(fastest, prior_s=90, running=[9.0] * 40)
    assert alone.second_s is not None and alone.second_s < 9.0
    assert with_running.second_s is not None and with_running.second_s > 9.0


def test_a_job_just_submitted_does_not_move_the_first_fit():
    """Five of fifty jobs done by their 80 s poll, the rest still running: the
    plan leans on the spread prior. A job submitted a moment ago, running at
    5 s, says nothing about them, and must not move the aims (it once moved
    the second aim from 90 s to 116 s, the fit's start having moved)."""
    first = [Sample(40.0, 80.0)] * 5
    plan = plan_from(first, prior_s=90, running=[80.0] * 45)
    with_new_job = plan_from(first, prior_s=90, running=[80.0] * 45 + [5.0])
    assert plan.second_s is not None and with_new_job.second_s is not None
    assert abs(with_new_job.second_s / plan.second_s - 1) < 0.01
    assert abs(with_new_job.first_s / plan.first_s - 1) < 0.01


def test_no_stored_sample_a_worker_could_write_breaks_the_plan(redis_url):
    """Garbage samples, clocks that stepped back, no time at all, unreadable job
    hashes in the slots: ignored, never a NaN, a zero or a negative wait, never
    an exception in the poll step."""
    model = DurationModel(redis.Redis.from_url(redis_url, decode_responses=True), 90.0)
    shape = ("alibaba/wan2.1-t2v-turbo", "720P")
    key = keys.durations(*shape)
    model.redis.delete(key)
    model.redis.lpush(key, *[f"{t - 0.5}:{t}" for t in (9.5, 10, 10.5, 11, 9.8, 10.2)])
    for raw in ("x", "nan", "inf", "5:nan", "0:0", "-1:-0.5", "7:3", "1e300:1e300") * 2:
        model.redis.lpush(key, raw)
    model.record(*shape, 0.0, -3.0)
    model.record(*shape, 80.0, math.nan)
    assert model.redis.llen(key) == 6 + 16
    ours = json.dumps({"model": shape[0]})
    for ref, fields in {"g:1": {"request": "{not json", "polls": "1", "last_poll_age": "5"},
                        "g:2": {"request": ours, "polls": "x", "last_poll_age": "5"},
                        "g:3": {"request": ours, "polls": "2", "last_poll_age": "nan"},
                        "g:4": {"request": "[1]", "polls": "1", "last_poll_age": "5"},
                        "g:5": {"request": ours, "polls": "2", "last_poll_age": "9.5"}}.items():
        model.redis.hset(keys.job(ref), mapping=fields)
        model.redis.zadd(keys.SLOTS, {ref: 0})
    assert model._running(*shape) == [9.5]  # unreadable job hashes are skipped
    model._cache.clear()
    plan = model.plan(*shape)
    assert plan.second_s is not None and 9.5 < plan.second_s < 11.5
    for value in (plan.first_s, plan.second_s, plan.step_s):
        assert math.isfinite(value) and value > 0


def test_a_job_that_never_finishes_is_polled_less_and_less_often():
    """No float overflow however long a job runs; a too-late plan's steps grow with
    the job's age instead of staying small all night."""
    learned = PollPlan(9.0, 10.0, 0.5, 10.0)
    assert learned.delay(5000, 10.0 + 0.5 * 5000, 0.5, 600) == 600
    too_late = PollPlan(32.0, None, 0.0, 2.56)
    elapsed, polls = 0.0, 0
    while elapsed < 10_000:
        elapsed += too_late.delay(polls, elapsed, 0.5, 600)
        polls += 1
    assert polls < 100, polls
    cold = plan_from([], prior_s=90)
    assert cold.delay(12, 5000.0, 0.5, 600) == 90  # the cold start's waits stay the prior


def test_stuck_jobs_in_slots_do_not_stretch_the_first_fit():
    """Five completions at ~5 s and forty jobs stuck for 900 s: they count only as
    running past twice the longest completion. The plan moves later (most jobs
    take longer than 11 s), but not to the 600 s a fit of the raw ages gave."""
    fastest = [Sample(t - 0.25, t + 0.25) for t in (4.5, 4.8, 5.0, 5.2, 5.5)]
    plan = plan_from(fastest, prior_s=90, running=[900.0] * 40)
    assert plan.second_s is not None and 11.5 < plan.second_s < 120 and plan.first_s < 60


@pytest.mark.slow
def test_prior_90_s_learns_1_s_generations_from_censored_first_polls(make_pipeline,
                                                                       tmp_path):
    """Every first poll of the cold start finds the video done: the plan moves earlier
    until completions are bracketed, and late jobs are detected far sooner."""
    pipeline = make_pipeline(VIDQ_EXPECTED_GENERATION_S=90, VIDQ_POLL_MAX_INTERVAL_S=10)
    pipeline.start_workers()
    prompts = [f"learn {i}" for i in range(36)]
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", prompts), "learn")

    assert pipeline.wait_finished("learn", timeout_s=150)["done"] == 36
    lags = _lags(pipeline, "learn")
    first, last = statistics.median(lags[:4]), statistics.median(lags[-12:])
    assert first > 2.5, lags  # the cold start's first poll is at 5 s
    assert last < 0.6, lags   # ~1 s generations, found within a fraction of that


@pytest.mark.slow
def test_the_plan_follows_a_drop_in_generation_time(make_pipeline, make_sandbox, tmp_path):
    """Learned at ~2 s, the upstream turns ~4x faster: the plan follows."""
    pipeline = learned_then(make_pipeline, make_sandbox, tmp_path,
                            (45, [f"slow {i}" for i in range(16)], 120),
                            (180, [f"fast {i}" for i in range(24)], 120),
                            VIDQ_EXPECTED_GENERATION_S=90)
    lags = _lags(pipeline, "b")
    assert statistics.median(lags[-10:]) < 0.35, lags  # ~0.5 s generations


def test_a_recovered_chain_records_no_generation_time(make_pipeline, make_sandbox, tmp_path):
    """A job whose chain was re-sent by the reconciler says nothing about the upstream:
    its completion adds no sample (one crash must not poison the plan)."""
    # ~5 s generations: marked recovered long before it completes, even when
    # the test process stalls (at ~1 s, a 1 s stall let a sample in).
    pipeline = make_pipeline(make_sandbox(time_scale=18))
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["recovered"]), "rc")
    (job_id,) = pipeline.store.job_ids("rc")
    ref = keys.job_ref("rc", job_id)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not pipeline.store.get(ref).generation_id:
        time.sleep(0.05)
    pipeline.store.redis.hset(keys.job(ref), "recovered", "1")

    assert pipeline.wait_finished("rc")["done"] == 1
    key = keys.durations("alibaba/wan2.1-t2v-turbo", "720P")
    assert pipeline.store.redis.llen(key) == 0


@pytest.mark.slow
def test_429s_pause_every_worker_lower_c_to_the_real_limit_and_fail_no_job(
        make_pipeline, make_sandbox, tmp_path):
    """The account really allows 2, C is configured at 5: submits that meet 429 go
    back to the front of the line (no attempt spent), the effective C drops to the
    real limit, and every job ends done."""
    sandbox = make_sandbox(max_concurrency=2)
    pipeline = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT=5)
    pipeline.start_workers(count=2, concurrency=2)
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"limited {i}" for i in range(16)]), "rl")
    lowest = 5
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        lowest = min(lowest, pipeline.admission.effective_cap() or 5)
        counts = pipeline.store.counts("rl")
        if counts["done"] + counts["failed"] == 16:
            break
        time.sleep(0.05)

    assert pipeline.store.counts("rl")["done"] == 16
    stats = sandbox.stats()
    print(f"\n429s answered: {stats['rate_limited']} for 16 jobs; effective C reached {lowest}")
    assert lowest == 2
    assert stats["max_in_flight"] == 2 and stats["submissions"] == 16
    assert stats["rate_limited"] <= 8


def test_a_429_on_a_status_get_pauses_polls_for_every_worker(make_pipeline, make_sandbox,
                                                             tmp_path):
    sandbox = make_sandbox()
    pipeline = make_pipeline(sandbox)
    pipeline.faults(poll=[429], retry_after=5)  # outlasts the 1 s look below, with room
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"paused {i}" for i in range(4)]), "pp")
    deadline = time.monotonic() + 20
    seen = False
    while time.monotonic() < deadline and not seen:
        seen = pipeline.store.redis.pttl(keys.PAUSE_POLL) > 0
        time.sleep(0.02)
    assert seen, "no poll pause after a 429 on a status GET"
    polls_at_pause = sandbox.stats()["polls"]
    time.sleep(1.0)
    assert sandbox.stats()["polls"] <= polls_at_pause + 1  # nobody polled during the pause

    assert pipeline.wait_finished("pp", timeout_s=60)["done"] == 4
