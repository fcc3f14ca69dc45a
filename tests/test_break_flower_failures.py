"""Issue 15, "failures as failures", tried against every way a job can fail: Flower's Failed
filter (the tasks page's `state:FAILURE` search) lists exactly the failed jobs, one failed
task each, with their reasons: an outcome-unknown POST (the sandbox answers 500), a
generation the upstream ended in error (poll), and a video that is not an MP4 (download,
given up at the hard limit). The job is failed in Redis before its task fails, the
messages are acknowledged (kombu's `unacked` hash is empty) and no step of a failed job
runs after its failure. No task field carries a prompt or the API key."""
from __future__ import annotations

import json
import shutil
import time

import pytest
import requests
from conftest import wait_until
from test_flower import AUTH, start_flower, stop_flower

from worker import keys

BATCH = "fails"
JOBS = [  # C = 1: admitted in this order, so the first POST is the one answered 500
    {"id": "unknown", "prompt": "a harbour at dawn"},
    {"id": "rejected", "prompt": "REJECT a scene the content policy refuses"},
    {"id": "corrupt", "prompt": "a fox in fresh snow", "resolution": "480P"},
    {"id": "fine", "prompt": "rain on a tin roof"},
]
REASONS = {"unknown": "outcome_unknown", "rejected": "ContentPolicyViolation",
           "corrupt": "not an MP4"}


def _sandbox_serving_a_corrupt_480p_video(make_sandbox, video_cache, tmp_path):
    """The real sandbox, whose 480P 16:9 clip is an HTML error page served as video/mp4
    (as a CDN answering 200 with an error body would): every 480P download is corrupt."""
    cache = tmp_path / "sandbox-cache"
    cache.mkdir()
    for clip in video_cache.glob("1280x720.mp4"):
        shutil.copy(clip, cache / clip.name)
    (cache / "854x480.mp4").write_bytes(b"<html><body>503 upstream busy</body></html>\n" * 50)
    return make_sandbox(cache_dir=cache)


def _failure_filter(base: str) -> set[str]:
    """The uuids the tasks page lists after a click on Failed (its datatable request)."""
    answer = requests.get(base + "/tasks/datatable", auth=AUTH, timeout=10, params={
        "draw": 1, "start": 0, "length": 100, "search[value]": "state:FAILURE",
        "order[0][column]": 0, "order[0][dir]": "asc", "columns[0][data]": "received"})
    answer.raise_for_status()
    return {row["uuid"] for row in answer.json()["data"]}


@pytest.mark.slow
def test_failed_filter_lists_exactly_the_failed_jobs_once_each(make_pipeline, make_sandbox,
                                                               video_cache, tmp_path):
    sandbox = _sandbox_serving_a_corrupt_480p_video(make_sandbox, video_cache, tmp_path)
    pipeline = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT=1, VIDQ_MAX_ATTEMPTS=3,
                             VIDQ_DEADLINE_S=4, VIDQ_HARD_LIMIT_S=5,
                             VIDQ_OVERDUE_POLL_INTERVAL_S=0.5)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(job) + "\n" for job in JOBS))
    flower, base, log = start_flower(pipeline.env, tmp_path)
    try:
        pipeline.enqueue(prompts, BATCH)  # no C before a worker starts: nothing admitted yet
        pipeline.faults(submit=[500])
        pipeline.start_workers()
        counts = pipeline.wait_finished(BATCH, timeout_s=60)

        def failures_shown():  # events reach Flower asynchronously
            shown = requests.get(base + "/api/tasks", auth=AUTH, timeout=10).json()
            return sum(task["state"] == "FAILURE" for task in shown.values()) >= len(REASONS)

        wait_until(failures_shown, 30, "Flower to show the failures", 0.5)
        time.sleep(2.0)  # a redelivery would show by now
        tasks = requests.get(base + "/api/tasks", auth=AUTH, timeout=10).json()
        failed_filter = _failure_filter(base)
    finally:
        stop_flower(flower)
    where = f"Flower log {log}, worker logs {pipeline.log_dir}"
    assert (counts["done"], counts["failed"]) == (1, 3), (counts, where)
    records = {job["id"]: pipeline.store.redis.hgetall(keys.job(keys.job_ref(BATCH, job["id"])))
               for job in JOBS}

    failures = {uuid: task for uuid, task in tasks.items() if task["state"] == "FAILURE"}
    assert failed_filter == set(failures), (failed_filter, set(failures), where)
    for job_id, reason in REASONS.items():
        ref, record = keys.job_ref(BATCH, job_id), records[job_id]
        assert record["state"] == "failed" and reason in record["last_error"], (record, where)
        mine = [t for t in tasks.values() if f"'{ref}'" in (t["args"] or "")]
        failed = [t for t in mine if t["state"] == "FAILURE"]
        assert len(failed) == 1, f"{ref}: {len(failed)} failed tasks: {failed}; {where}"
        (task,) = failed
        assert "JobFailed" in task["exception"] and reason in task["exception"], (task, where)
        # Recorded first: the job's failed_at (Redis time) precedes the task's failure.
        assert float(record["failed_at"]) <= task["failed"] + 0.05, (record, task)
        later = [t for t in mine if (t["received"] or 0) > task["failed"]]
        assert not later, f"{ref}: steps ran after its failure: {later}; {where}"
    assert not [t for t in failures.values() if f"'{keys.job_ref(BATCH, 'fine')}'" in t["args"]]
    assert pipeline.store.redis.hlen("unacked") == 0, "a message was left unacknowledged"

    dump = json.dumps(tasks)
    for job in JOBS:
        assert job["prompt"] not in dump, f"prompt {job['prompt']!r} visible in Flower"
    assert sandbox.config.api_key not in dump
