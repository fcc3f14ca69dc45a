"""A worker's prefetch count after countdown messages meet its limit
(worker/prefetch_fix.py). Real Redis, a real worker process, the sandbox
over HTTP."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import wait_until, write_prompts

from worker.celery_app import QUEUES, WEBHOOK_QUEUE
from worker.tasks import dispatch


def test_countdowns_that_meet_the_limit_leave_the_worker_fetching_as_before(
        make_pipeline, make_sandbox, tmp_path):
    """A steps-only worker at C = 4 holds up to 28 countdowns. Each one that
    arrived at that limit cost a unit of prefetch for good (kombu clamps the
    count up, celery takes it down in full): after one burst of 40 the worker
    fetched one message at a time, and a batch at C = 4 ran one job at a time."""
    sandbox = make_sandbox(time_scale=30)  # ~3 s generations
    pipeline = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT="4")
    pipeline.start_workers(1, concurrency=2, queues=[q for q in QUEUES if q != WEBHOOK_QUEUE])
    for n in range(40):  # polls of jobs that do not exist: each ends "stale message"
        dispatch("poll", f"burst:{n}", "stale", 2.0)
    log = pipeline.log_dir / "worker-0.log"
    wait_until(lambda: log.read_text().count("stale message, nothing to do") == 40, 60,
               "the burst run")

    assert _prefetch_count(pipeline) == 2  # -c 2, nothing held: as at start

    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"clip {i}" for i in range(12)]), "b")
    assert pipeline.wait_finished("b", timeout_s=120)["done"] == 12
    assert sandbox.stats()["max_in_flight"] == 4
    pipeline.stop_workers()


def _prefetch_count(pipeline) -> int:
    """What `celery inspect stats` (and Flower's worker page) says."""
    stats = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "inspect", "stats",
                            "--json"], env=pipeline.env, capture_output=True, text=True,
                           timeout=60)
    assert stats.returncode == 0, stats.stderr
    [(_, worker)] = json.loads(stats.stdout).items()
    return worker["prefetch_count"]
