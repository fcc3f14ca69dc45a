"""Breaking the capacity plan (issue 14): jobs already waiting or in flight are
counted at their own generation times, not at the new batch's."""
from __future__ import annotations

import os
import subprocess
import time

import pytest
import redis
from conftest import write_prompts

from producer.enqueue import open_admission
from producer.plan import capacity_plan
from worker import keys
from worker.durations import DurationModel
from worker.settings import Settings

MODEL = "alibaba/wan2.1-t2v-turbo"


def _learn(client: redis.Redis, resolution: str, seconds: float) -> None:
    model = DurationModel(client, 90.0)
    for spread in (-0.5, 0.0, 0.5, 0.0, -0.2, 0.2):
        model.record(MODEL, resolution, seconds + spread - 1, seconds + spread)


def test_jobs_ahead_count_at_their_own_resolutions_time(redis_url):
    """Given 720P learned at ~100 s and 480P at ~10 s, 200 720P jobs waiting in
    another batch and 2 in flight, a plan for 20 480P videos counts the night's
    work as 20 x 10 + 202 x 100 s, not 222 x 10 s (the new batch's mean)."""
    settings = Settings.from_env({"VIDQ_REDIS_URL": redis_url, "VIDQ_MAX_IN_FLIGHT": "2"})
    admission = open_admission(settings)
    client = admission.redis
    _learn(client, "720P", 100.0)
    _learn(client, "480P", 10.0)
    admission.set_cap(2)
    admission.enqueue("big", [(f"j{i}", {"model": MODEL, "prompt": f"p{i}",
                                         "resolution": "720P"}) for i in range(202)],
                      time.time())
    assert len(admission.pump()) == 2  # two of them hold the slots now
    model = DurationModel(client, 90.0)
    slow, fast = model.typical_s(MODEL, "720P")[0], model.typical_s(MODEL, "480P")[0]
    assert slow > 5 * fast

    plan = capacity_plan(client, settings, [{"model": MODEL, "prompt": f"q{i}",
                                             "resolution": "480P"} for i in range(20)])
    assert plan.ahead == 202
    assert plan.work_s == pytest.approx(20 * fast + 202 * slow)
    assert plan.duration_s() == pytest.approx((20 * fast + 202 * slow) / (2 * 0.9))


def test_a_refused_deadline_leaves_no_batch_settings_behind(redis_url, tmp_path):
    """`vidq enqueue --deadline` that cannot be met, with --priority, --max-credits
    and --webhook: exit 2 and not one key of the batch in Redis (no settings,
    no line, no job), nothing in any ring."""
    path = write_prompts(tmp_path / "p.txt", [f"prompt {i}" for i in range(100)])
    env = {**os.environ, "VIDQ_REDIS_URL": redis_url, "VIDQ_MAX_IN_FLIGHT": "2"}
    result = subprocess.run(
        ["vidq", "enqueue", str(path), "--batch", "late", "--deadline", "10m",
         "--priority", "high", "--max-credits", "1e9", "--webhook", "https://example.com/h"],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot finish in 10 min" in result.stderr
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert [k for k in client.keys("*") if "late" in k] == []
    assert not client.sismember(keys.BATCHES, "late")
    assert all(client.llen(keys.ring(p)) == 0 for p in ("high", "normal", "low"))
