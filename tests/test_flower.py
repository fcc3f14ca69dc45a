"""Flower sees vidq's tasks through Celery events, and the events carry no secrets."""
from __future__ import annotations

import subprocess
import sys
import time

import requests
from conftest import wait_http, write_prompts

from producer.redis_server import free_port


def test_flower_shows_each_step_without_prompts_or_key(make_pipeline, tmp_path):
    """Flower's task list has submit, poll and download; args are refs and tokens only."""
    pipeline = make_pipeline()
    port = free_port()
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={port}",
         "--address=127.0.0.1", "--basic-auth=ops:night-shift"], env=pipeline.env,
        stdout=open(tmp_path / "flower.log", "wb"), stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthcheck", flower, tmp_path / "flower.log")
        pipeline.start_workers()
        pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["a secret garden at noon",
                                                           "REJECT this one"]), "fl")
        assert pipeline.wait_finished("fl")["done"] == 1
        time.sleep(1.5)  # events reach Flower asynchronously
        tasks = requests.get(base + "/api/tasks", auth=("ops", "night-shift"), timeout=10).json()
    finally:
        flower.terminate()
        flower.wait(10)
    names = {task["name"] for task in tasks.values()}
    assert {"vidq.submit", "vidq.poll", "vidq.download"} <= names
    dump = str(tasks)
    assert "secret garden" not in dump
    assert pipeline.sandbox.config.api_key not in dump

    # Readable rows: every finished task's result names its job and the batch's progress;
    # the step that failed the job is a failed task carrying the job's reason.
    succeeded = [t for t in tasks.values() if t["state"] == "SUCCESS"]
    assert succeeded and all("| batch " in (t["result"] or "") for t in succeeded)
    assert any("done" in t["result"] and "1/2 done" in t["result"] for t in succeeded)
    (failed,) = [t for t in tasks.values() if t["state"] == "FAILURE"]
    assert failed["name"] == "vidq.poll" and "JobFailed" in failed["exception"]
    assert "failed: poll:" in failed["exception"] and "fl:" in failed["exception"]
