"""bench.plan_sim, the simulation the poll plan's constants were weighed with,
runs the real plan code and accounts for every job."""
from __future__ import annotations

from bench.plan_sim import Sim, lag_floor, measure, zero_lag_efficiency


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
