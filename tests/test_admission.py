"""The upstream cap, admission without deadlock, one chain per job, recovery."""
from __future__ import annotations

import os
import signal
import time

from conftest import write_prompts

from worker.keys import job_ref
from worker.tasks import dispatch


def test_cap_holds_across_four_worker_processes(make_pipeline, make_sandbox, tmp_path):
    """With 4 workers and C=3, the sandbox never sees more than 3 in flight, and sees 3."""
    sandbox = make_sandbox(max_concurrency=100)
    pipeline = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT=3)
    pipeline.start_workers(count=4, concurrency=2)
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"cap {i}" for i in range(18)]), "cap")

    counts = pipeline.wait_finished("cap", timeout_s=120)

    assert counts["done"] == 18
    stats = sandbox.stats()
    assert stats["max_in_flight"] == 3
    assert stats["rate_limited"] == 0 and stats["submissions"] == 18


def test_one_worker_one_slot_consuming_all_queues_does_not_deadlock(make_pipeline, tmp_path):
    """A single worker process with one pool slot still finishes the whole batch."""
    pipeline = make_pipeline(VIDQ_MAX_IN_FLIGHT=2)
    pipeline.start_workers(count=1, concurrency=1)
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"solo {i}" for i in range(8)]), "solo")

    counts = pipeline.wait_finished("solo", timeout_s=120)

    assert counts["done"] == 8
    assert pipeline.sandbox.stats()["max_in_flight"] == 2


def _wait_for_poll_step(pipeline, ref, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = pipeline.store.get(ref)
        if job.step == "poll" and job.token and not job.token.startswith("run:"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {ref} never waited on a poll")


def test_duplicated_poll_message_runs_one_chain(make_pipeline, make_sandbox, tmp_path):
    """A poll delivered three times makes one chain: the sandbox counts only its GETs."""
    sandbox = make_sandbox(time_scale=20)  # ~4.5 s generations: time to duplicate a poll
    pipeline = make_pipeline(sandbox, VIDQ_EXPECTED_GENERATION_S=4.5)
    pipeline.start_workers(count=2, concurrency=2)
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["twin polls"]), "dup")
    (job_id,) = pipeline.store.job_ids("dup")
    ref = job_ref("dup", job_id)
    job = _wait_for_poll_step(pipeline, ref)

    dispatch("poll", ref, job.token, 0)
    dispatch("poll", ref, job.token, 0)
    counts = pipeline.wait_finished("dup")

    assert counts["done"] == 1
    (entry,) = pipeline.ledger()
    assert entry["polls"] == pipeline.store.get(ref).polls
    assert entry["polls"] <= 4


def test_killed_worker_loses_no_video(make_pipeline, make_sandbox, tmp_path):
    """SIGKILL the only worker while it holds countdown polls; a new one finishes all."""
    sandbox = make_sandbox(time_scale=30)  # ~3 s generations
    pipeline = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT=4, VIDQ_EXPECTED_GENERATION_S=3)
    pipeline.start_workers(count=1, concurrency=2)
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"crash {i}" for i in range(6)]), "kill")
    deadline = time.monotonic() + 30
    while pipeline.store.counts("kill")["submitted"] + pipeline.store.counts("kill")["generating"] < 4:
        assert time.monotonic() < deadline, pipeline.store.counts("kill")
        time.sleep(0.05)

    os.kill(pipeline.processes[0].pid, signal.SIGKILL)
    pipeline.processes[0].wait()
    pipeline.processes.clear()
    pipeline.start_workers(count=1, concurrency=2)
    counts = pipeline.wait_finished("kill", timeout_s=120)

    assert counts["done"] == 6
    stats = sandbox.stats()
    assert stats["submissions"] == 6 and stats["duplicate_prompts"] == 0
    assert stats["max_in_flight"] <= 4


def test_a_big_backlog_publishes_only_as_many_tasks_as_slots(make_pipeline, make_sandbox,
                                                             tmp_path):
    """2,000 queued jobs at C=5: the rest wait in their batch's line, not as Celery tasks."""
    import redis as redis_lib

    pipeline = make_pipeline(make_sandbox(max_concurrency=5), VIDQ_MAX_IN_FLIGHT=5)
    pipeline.start_workers(count=1, concurrency=2)
    prompts = [f"backlog {i}" for i in range(2000)]
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", prompts), "big")
    client = redis_lib.Redis.from_url(pipeline.settings.redis_url)

    samples = []
    for _ in range(15):
        queued = sum(client.llen(name) for name in ("vidq.submit", "vidq.poll", "vidq.download"))
        samples.append((queued + client.hlen("unacked"), client.zcard("vidq:batch:big:line")))
        time.sleep(0.2)

    # Each of the 5 slot holders has one task (submit, poll or download),
    # plus at most 5 downloads of just-completed jobs.
    assert max(tasks for tasks, _ in samples) <= 10, samples
    assert min(waiting for _, waiting in samples) >= 2000 - 5 - 60
    assert pipeline.sandbox.stats()["rate_limited"] == 0
