"""Submissions per second, the upstream's other limit, on real workers,
Redis and the sandbox (which refuses POSTs past its per-second limit)."""
from __future__ import annotations

import time

import pytest
from conftest import write_prompts

from worker import keys


def _most_in_one_second(times: list[float]) -> int:
    times = sorted(times)
    return max(sum(1 for t in times[i:] if t < start + 1.0) for i, start in enumerate(times))


@pytest.mark.slow
def test_a_batch_start_is_paced_under_the_rate_and_never_lowers_c(make_pipeline, make_sandbox,
                                                                  tmp_path):
    """C = 8 slots open at once, the account takes 3 POSTs a second: the
    POSTs go out one turn at a time, across two worker processes, they meet
    no 429 (one at most, on a loaded machine, read as the rate's, not as a
    lower concurrency limit), and all 8 slots fill."""
    # 4.5 s generations: the 8 slots fill (in 8/3 s) before the first ends.
    sandbox = make_sandbox(max_concurrency=8, max_submits_per_s=3, time_scale=20)
    pipeline = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT=8, VIDQ_MAX_SUBMITS_PER_S=3)
    pipeline.start_workers(count=2, concurrency=4)

    stats, posted = _sixteen_paced(pipeline, sandbox, tmp_path)

    assert _most_in_one_second(posted) <= 3
    assert stats["max_in_flight"] == 8  # the slots were used, not starved by the pacing


def _sixteen_paced(pipeline, sandbox, tmp_path) -> tuple[dict, list[float]]:
    """16 prompts run to the end: the sandbox's stats and POST times, once
    checked that each was POSTed once and that no 429 lowered C."""
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"paced {i}" for i in range(16)]), "p")
    counts = pipeline.wait_finished("p", timeout_s=120)
    stats = sandbox.stats()
    posted = [entry["submitted_at"] for entry in pipeline.ledger()]
    print(f"\n16 POSTs over {max(posted) - min(posted):.1f} s, at most "
          f"{_most_in_one_second(posted)} in one second; 429s: {stats['rate_limited']}")
    assert counts["done"] == 16 and stats["submissions"] == 16
    # A POST counted on time may still reach the upstream late (a loaded
    # machine): one 429 then, no more, and it must not lower C.
    assert stats["too_fast"] <= 1 and stats["rate_limited"] == stats["too_fast"]
    assert pipeline.admission.effective_cap() is None
    return stats, posted


def test_turns_left_by_a_clock_stepped_back_do_not_stall_posts(make_pipeline, make_sandbox,
                                                              tmp_path):
    """Redis's clock stepped back 90 s (a failover to a replica behind, an NTP
    fix): the turn, and the sends, booked on the old clock lie 90 s ahead.
    No POST waits for them: none can wait longer than every slot's turn."""
    sandbox = make_sandbox(max_concurrency=4)
    pipeline = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT=4, VIDQ_MAX_SUBMITS_PER_S=2)
    seconds, micros = pipeline.store.redis.time()
    ahead_ms = seconds * 1000 + micros // 1000 + 90_000
    pipeline.store.redis.set(keys.POST_TURNS, ahead_ms, px=200_000)
    pipeline.store.redis.zadd(keys.POSTS_SENT, {"old-a": ahead_ms, "old-b": ahead_ms - 400})
    pipeline.start_workers()
    started = time.monotonic()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"stepped {i}" for i in range(4)]), "s")

    counts = pipeline.wait_finished("s", timeout_s=60)

    assert counts["done"] == 4
    assert time.monotonic() - started < 30  # not 90 s of idle slots


@pytest.mark.slow
def test_workers_started_with_different_rates_post_at_the_lowest(make_pipeline, make_sandbox,
                                                                 tmp_path):
    """Two worker groups, one started with VIDQ_MAX_SUBMITS_PER_S=2 (the
    account's), one with 10 (another shell's): each paced its own POSTs, the
    second's met 429s, and those halved the effective C for the rest of the
    batch (a review measured 212 idle slot-seconds against 29). Both keep to
    the lowest, as C is the lowest of theirs: no 429, C never lowered."""
    sandbox = make_sandbox(max_concurrency=8, max_submits_per_s=2, time_scale=20)
    pipeline = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT=8, VIDQ_MAX_SUBMITS_PER_S=2)
    pipeline.start_workers(count=1, concurrency=4)
    pipeline.env = {**pipeline.env, "VIDQ_MAX_SUBMITS_PER_S": "10"}
    pipeline.start_workers(count=1, concurrency=4)

    _, posted = _sixteen_paced(pipeline, sandbox, tmp_path)

    assert _most_in_one_second(posted) <= 2
    assert pipeline.store.redis.hget(keys.CONFIG, "submit_rate") == "2.0"
