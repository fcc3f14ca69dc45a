"""bench.plan_sim, the simulation the poll plan's constants were weighed with,
runs the real plan code and accounts for every job."""
from __future__ import annotations

from bench.plan_sim import Oracle, Sim, exact_plan, lag_floor, measure, zero_lag_efficiency


def test_the_simulation_sees_every_job_done_never_early_and_never_above_c():
    sim = Sim("true30", seed=1, n=120, cap=10, reaim=True)
    jobs = sim.run()
    assert len(jobs) == 120 and all(job.detect > 0 for job in jobs)
    assert all(job.detect >= job.submit + job.gen for job in jobs)  # no poll sees the future
    assert sim.max_in_flight == 10
    row = measure(jobs, 10)
    assert row["gets_med"] <= 3 and 0.5 < row["eff_all"] < zero_lag_efficiency(jobs, 10) <= 1.0


def test_the_lag_floor_is_that_of_a_normal_with_half_found_by_the_second_poll():
    floor, first = lag_floor()
    assert 0.22 < floor < 0.24 and -0.8 < first < -0.7


def test_the_oracle_bound_aims_exactly_and_switches_at_the_first_news():
    """The bound the drift is weighed against: exact aims for 90 s, then for 45 s
    from the first poll that finds a 45 s job done; its lag is below the plan's."""
    oracle = Oracle("drift", seed=2, n=200, cap=10, reaim=True)
    jobs = oracle.run()
    assert all(job.detect >= job.submit + job.gen for job in jobs)
    assert oracle.exact == exact_plan(45.0) and oracle.max_in_flight == 10
    first_news = min(job.detect for job in jobs if job.t == 45.0)
    assert all(job.first_aim == exact_plan(45.0).first_s
               for job in jobs if job.submit > first_news)
    planned = measure(Sim("drift", seed=2, n=200, cap=10, reaim=True).run(), 10)
    assert measure(jobs, 10)["lag_p95_3c"] < planned["lag_p95_3c"]


def test_a_later_second_aim_buys_the_median_of_two_gets_with_lag(monkeypatch):
    """What `--z-second` shows: aimed later past the median, more videos are found
    by their second GET and the early ones wait longer (same jobs, same seeds)."""
    from worker import schedule

    rows = {}
    for z in (0.0, 0.4):
        monkeypatch.setattr(schedule, "Z_SECOND", z)
        runs = [measure(Sim("right", seed=seed, n=200, cap=10, reaim=True).run(), 10)
                for seed in range(3)]
        rows[z] = {key: sum(r[key] for r in runs) / 3 for key in ("le2", "lag_p95_3c")}
    assert rows[0.4]["le2"] > rows[0.0]["le2"] + 0.05
    assert rows[0.4]["lag_p95_3c"] > rows[0.0]["lag_p95_3c"]
