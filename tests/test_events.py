"""The event stream: real Redis, real workers, the sandbox over HTTP, and the
example consumer run as a process and SIGKILLed mid-way."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from conftest import wait_until, write_prompts

from producer.enqueue import open_admission
from worker import events
from worker.jobs import State
from worker.keys import EVENTS
from worker.settings import Settings

CONSUMER = Path(__file__).resolve().parents[1] / "examples" / "events_consumer.py"
PROMPTS = ["a red kite over dunes", "a lighthouse at dusk", "REJECT this one",
           "rain on a tin roof", "a fox in fresh snow"]


def _events(url: str) -> list[tuple[str, dict]]:
    return redis.Redis.from_url(url, decode_responses=True).xrange(EVENTS)




def _finished_batch(make_pipeline, tmp_path, batch: str):
    pipeline = make_pipeline()
    pipeline.start_workers(1, concurrency=4)
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", PROMPTS), batch)
    pipeline.wait_finished(batch)
    url = pipeline.env["VIDQ_REDIS_URL"]
    wait_until(lambda: [e for e in _events(url) if e[1]["type"] == "batch.finished"],
              what="the batch.finished event")
    return pipeline, url


def test_a_batch_announces_each_video_each_failure_and_its_end_once(make_pipeline, tmp_path):
    """Given a sandbox batch of 4 good prompts and 1 the upstream rejects, the
    stream holds one video.stored per video (sha256, bytes and URL of the
    stored file), one job.failed with the reason, and one batch.finished."""
    pipeline, url = _finished_batch(make_pipeline, tmp_path, "ev1")
    time.sleep(1.5)  # a reconciler pass or two: nothing may be announced again
    found = _events(url)
    by_type: dict[str, list[dict]] = {}
    for _, fields in found:
        by_type.setdefault(fields["type"], []).append(fields)
    assert sorted(by_type) == ["batch.finished", "job.failed", "video.stored"]
    videos = by_type["video.stored"]
    assert len(videos) == 4 and len({v["job"] for v in videos}) == 4
    for video in videos:
        path = Path(video["storage_url"].removeprefix("file://"))
        assert path == tmp_path / "videos" / "ev1" / f"{video['custom_id']}.mp4"
        data = path.read_bytes()
        assert video["sha256"] == hashlib.sha256(data).hexdigest()
        assert int(video["bytes"]) == len(data)
        job = pipeline.store.get(video["job"])
        assert job is not None and video["generation_id"] == job.generation_id != ""
        assert video["v"] == "1" and video["batch"] == "ev1"
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert sidecar["sha256"] == video["sha256"]
    (failed,) = by_type["job.failed"]
    assert "REJECT" in pipeline.store.get(failed["job"]).request["prompt"]  # type: ignore[union-attr]
    assert failed["reason"] and failed["outcome_unknown"] == "0"
    assert failed["reason"] == pipeline.store.get(failed["job"]).last_error  # type: ignore[union-attr]
    (batch,) = by_type["batch.finished"]
    assert (batch["total"], batch["done"], batch["failed"]) == ("5", "4", "1")
    assert Path(batch["manifest_url"].removeprefix("file://")).is_file()


def test_a_repeated_or_stale_transition_announces_nothing_more(redis_url):
    """A job moved to failed is announced once: the same step again (its token
    gone) and changes that end in no final state add no event."""
    settings = Settings.from_env({"VIDQ_REDIS_URL": redis_url})
    admission = open_admission(settings)
    admission.set_cap(2)
    admission.enqueue("ev2", [("j1", {"model": "m", "prompt": "p"})], time.time())
    ((ref, token),) = admission.pump()
    store = admission.store
    job = store.get(ref)
    assert job is not None
    assert store.transition(job, state=State.GENERATING, next_step="poll", due_in_s=5) not in (
        None, "0")
    assert _events(redis_url) == []
    job = store.get(ref)
    assert job is not None
    assert store.transition(job, state=State.FAILED, release_slot=True, last_error="boom") == "0"
    assert store.transition(job, state=State.FAILED, release_slot=True, last_error="boom") is None
    found = _events(redis_url)
    assert [(f["type"], f["job"], f["reason"]) for _, f in found] == [
        ("job.failed", ref, "boom")]


def test_trimming_keeps_about_maxlen_entries(redis_url):
    """The stream is trimmed to about VIDQ_EVENTS_MAXLEN, never below it."""
    client = redis.Redis.from_url(redis_url)
    pipe = client.pipeline(transaction=False)
    for n in range(3000):
        pipe.xadd(EVENTS, {"v": "1", "type": "video.stored", "n": str(n)})
    pipe.execute()
    events.trim(client, 500)
    assert 500 <= client.xlen(EVENTS) < 1000


def _run_consumer(url: str, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(CONSUMER), "--redis-url", url, "--group", "pipeline",
         "--consumer", "c1", "--out", str(out), "--count", "2", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_the_example_consumer_killed_midway_resumes_and_acks_every_event(make_pipeline,
                                                                        tmp_path):
    """Given a finished batch's events, the example consumer SIGKILLed after a
    few events and started again processes every event and leaves none pending."""
    _, url = _finished_batch(make_pipeline, tmp_path, "ev3")
    ids = [event_id for event_id, _ in _events(url)]
    out = tmp_path / "consumed.jsonl"
    first = _run_consumer(url, out, "--delay-s", "0.5")
    wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 2,
              what="two processed events")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    client = redis.Redis.from_url(url, decode_responses=True)
    before = len(out.read_text().splitlines())
    assert before < len(ids), "killed too late to test a resume"
    assert client.xpending(EVENTS, "pipeline")["pending"] > 0  # read, never acked
    second = _run_consumer(url, out, "--idle-exit-s", "1")
    output, _ = second.communicate(timeout=30)
    assert second.returncode == 0, output
    consumed = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert set(consumed) == set(ids)
    assert len(consumed) <= len(ids) + 1  # at most the one in hand when killed, twice
    assert client.xpending(EVENTS, "pipeline")["pending"] == 0


@pytest.mark.slow
def test_killed_workers_and_a_redis_restart_announce_each_video_exactly_once(
        make_pipeline, make_sandbox, restartable_redis, tmp_path):
    """Given a batch during which a worker is SIGKILLed and Redis (AOF, fsync
    always) restarted, every done job has exactly one video.stored event, with
    the stored file's sha256, and the batch one batch.finished."""
    sandbox = make_sandbox(time_scale=30, max_concurrency=100)
    pipeline = make_pipeline(sandbox, VIDQ_REDIS_URL=restartable_redis.url,
                             VIDQ_EXPECTED_GENERATION_S=3)
    pipeline.start_workers(count=2, concurrency=2)
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"crash {i}" for i in range(10)]), "cr")
    time.sleep(3)
    os.killpg(pipeline.processes[0].pid, signal.SIGKILL)
    pipeline.start_workers(1, concurrency=2)
    time.sleep(2)
    restartable_redis.stop()
    time.sleep(1)
    restartable_redis.start()
    counts = pipeline.wait_finished("cr", timeout_s=150)
    # A SIGKILL between a POST's marker and its answer leaves that job "outcome
    # unknown" (by design: never re-POSTed on its own); every other job is done.
    unknown = {job.id for job in map(pipeline.store.get, (
        f"cr:{job_id}" for job_id in pipeline.store.job_ids("cr")))
        if job.extra.get("outcome_unknown") == "1"}
    assert counts["done"] + len(unknown) == 10 and len(unknown) <= 1, counts
    wait_until(lambda: [e for e in _events(restartable_redis.url)
                       if e[1]["type"] == "batch.finished"], what="the batch.finished event")
    found = [fields for _, fields in _events(restartable_redis.url)]
    stored = Counter(f["job"] for f in found if f["type"] == "video.stored")
    assert stored == Counter({f"cr:{job_id}": 1 for job_id in pipeline.store.job_ids("cr")
                              if job_id not in unknown})
    for fields in found:
        if fields["type"] == "video.stored":
            data = Path(fields["storage_url"].removeprefix("file://")).read_bytes()
            assert fields["sha256"] == hashlib.sha256(data).hexdigest()
    assert [f["type"] for f in found].count("batch.finished") == 1


def test_the_example_consumer_pointed_at_no_redis_says_so_in_one_line(tmp_path):
    """A `vidq run`'s Redis lives on a port of its own, only while it runs: a
    consumer started with the wrong URL printed a redis-py traceback
    (review 124). One line, naming the URL, exit 1."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"  # nothing listens once closed
    consumer = _run_consumer(url, tmp_path / "out.jsonl")
    output, _ = consumer.communicate(timeout=60)
    assert consumer.returncode == 1
    assert output.startswith(f"error: Redis at --redis-url {url}: ") and \
        len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "out.jsonl").exists()
