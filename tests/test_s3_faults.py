"""S3 answering errors at the worst moments, through a fault proxy in front of
moto's real S3 server, with real workers and the sandbox: a paid video is
never deleted, never bought twice, never fetched again once stored whole."""
from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import time
from collections import Counter

import boto3
import pytest
import redis
from botocore.config import Config
from conftest import wait_until, write_prompts
from s3faults import S3FaultProxy
from test_s3 import _keys, _uploads, aws_env, bucket, s3, s3_endpoint  # noqa: F401
from test_steps import _admit_one, steps_for  # noqa: F401 - fixture

from worker import keys, tasks
from worker.storage_s3 import S3Storage

MiB = 1024 * 1024
PROMPTS = ["a paper boat on a river, take 1", "a paper boat on a river, take 2"]


@pytest.fixture
def s3_faults(s3_endpoint):  # noqa: F811
    proxy = S3FaultProxy(s3_endpoint)
    yield proxy
    proxy.stop()


def is_metadata_copy(request) -> bool:
    return request.method == "PUT" and "x-amz-copy-source" in request.headers


def test_a_failed_metadata_copy_keeps_the_whole_object(s3, bucket, s3_faults):  # noqa: F811
    """The upload completed, then the copy that attaches the sha256 failed: the
    object is the whole video, maybe a paid one no longer served, or another
    writer's. It stays, and its sha256 is read from its bytes."""
    client = boto3.client("s3", endpoint_url=s3_faults.url,
                          config=Config(retries={"mode": "standard"}))
    storage = S3Storage(bucket, "night", client=client, part_bytes=5 * MiB)
    data = bytes(range(256)) * (6 * MiB // 256)  # two parts
    copies = s3_faults.fail(is_metadata_copy, status=500, count=10)
    with storage.writer("b/j.mp4") as out:
        out.write(data)

    assert copies.hits == 3  # botocore's standard tries, all refused
    assert s3.get_object(Bucket=bucket, Key="night/b/j.mp4")["Body"].read() == data
    assert storage.sha256("b/j.mp4") == hashlib.sha256(data).hexdigest()
    assert _uploads(s3, bucket) == []


@pytest.mark.slow
def test_storage_that_cannot_answer_the_resume_check_is_no_reason_to_post(
        make_pipeline, make_sandbox, redis_url, aws_env, s3, bucket, s3_faults,  # noqa: F811
        tmp_path):
    """Redis lost, the batch enqueued again, its videos in S3, and S3 throttling
    the HEADs of the resume check: the check is asked again, nothing is bought."""
    sandbox = make_sandbox()
    env = {**aws_env, "AWS_ENDPOINT_URL": s3_faults.url,
           "VIDQ_STORAGE_URL": f"s3://{bucket}/night"}
    prompts = write_prompts(tmp_path / "p.txt", PROMPTS)
    first = make_pipeline(sandbox, **env)
    first.start_workers()
    first.enqueue(prompts, "b1")
    assert first.wait_finished("b1", timeout_s=60)["done"] == 2
    first.stop_workers()
    redis.Redis.from_url(redis_url).flushdb()

    heads = s3_faults.fail(lambda request: request.method == "HEAD", status=503, count=12)
    again = make_pipeline(sandbox, **env)
    again.start_workers()
    again.enqueue(prompts, "b1")
    assert again.wait_finished("b1", timeout_s=90)["done"] == 2

    assert len(again.ledger()) == 2  # the first run's POSTs only
    assert heads.hits == 12


@pytest.mark.slow
def test_storage_down_longer_than_the_attempts_fails_no_unpaid_job(
        make_pipeline, make_sandbox, aws_env, s3, bucket, s3_faults, tmp_path):  # noqa: F811
    """S3 answers the submits' resume checks 503 five times over, with
    VIDQ_MAX_ATTEMPTS = 2: the jobs wait in line, unpaid, spending no attempt,
    until S3 answers; then each is POSTed once and done. (Each failed check
    spent an attempt: an outage of a few minutes failed the prompts admitted
    during it, for a manual `vidq retry`.)"""
    env = {**aws_env, "AWS_ENDPOINT_URL": s3_faults.url,
           "VIDQ_STORAGE_URL": f"s3://{bucket}/night", "VIDQ_MAX_ATTEMPTS": "2"}
    pipeline = make_pipeline(make_sandbox(), **env)
    heads = s3_faults.fail(lambda request: request.method == "HEAD", status=503, count=15)
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", PROMPTS), "b1")

    counts = pipeline.wait_finished("b1", timeout_s=90)

    assert heads.hits == 15
    assert counts["done"] == len(PROMPTS), counts
    assert sorted(entry["prompt"] for entry in pipeline.ledger()) == sorted(PROMPTS)


@pytest.mark.slow
def test_a_store_full_for_longer_than_every_jobs_pauses_buys_no_more_videos(
        make_pipeline, make_sandbox, aws_env, s3, bucket, s3_faults, tmp_path):  # noqa: F811
    """MinIO's disk is full: every write answers 507 while reads work. Each
    paid job paused submits three times (storage_pause.PAUSES_PER_JOB), then
    the pause lapsed and the next C were bought, wave after wave, while
    `vidq status` said nothing of storage (helper 109: a whole batch bought
    in a scaled hour of full disk). Past its three, a job asks the store,
    which refuses the probe too: the outage is the store's, and the pause
    and the status line last as long as it does; once writes work, every
    video lands, each prompt POSTed once."""
    env = {**aws_env, "AWS_ENDPOINT_URL": s3_faults.url,
           "VIDQ_STORAGE_URL": f"s3://{bucket}/night", "VIDQ_MAX_IN_FLIGHT": "2"}
    pipeline = make_pipeline(make_sandbox(), **env)
    full = s3_faults.fail(lambda request: request.method in ("PUT", "POST"), status=507,
                          count=10**6)
    pipeline.start_workers()
    prompts = [f"a full disk, take {i}" for i in range(8)]
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", prompts), "b1")
    wait_until(lambda: pipeline.store.redis.exists(keys.STORAGE_FAILING), 60,
               "storage failing noticed")
    posted = len(pipeline.ledger())
    # Pauses of VIDQ_BACKOFF_CAP_S = 2 s, renewed by retries 0.1 to 2 s apart:
    # a job's three were spent within ~4 s, and the next C bought at ~12 s.
    said = []
    for _ in range(10):
        time.sleep(2)
        said.append(bool(pipeline.store.redis.exists(keys.STORAGE_FAILING)))
    status = subprocess.run(["vidq", "status", "b1"], env=pipeline.env, capture_output=True,
                            text=True, timeout=60)
    still_posted = len(pipeline.ledger())
    full.count = 0

    assert still_posted == posted < len(prompts), (posted, still_posted)
    assert all(said), said
    assert "storage failing (" in status.stdout and "XMinioStorageFull" in status.stdout
    assert pipeline.wait_finished("b1", timeout_s=120)["done"] == len(prompts)
    assert Counter(entry["prompt"] for entry in pipeline.ledger()) == Counter(prompts)
    assert len([key for key in _keys(s3, bucket) if key.endswith(".mp4")]) == len(prompts)


@pytest.mark.slow
def test_a_retried_batch_starts_its_storage_count_afresh(
        make_pipeline, make_sandbox, aws_env, s3, bucket, s3_faults, tmp_path):  # noqa: F811
    """Night one: S3 refuses everything; b1's jobs pause, spend their attempts
    and fail, unpaid. Morning: another batch stores a video. Then MinIO's
    disk fills and `vidq retry b1` runs. The jobs kept night one's storage
    count and its start: past their pauses, with a video stored since, every
    failure read as the job's own, and all of b1 was bought with nothing
    said (review 112). A requeue, and a POST, start the count afresh."""
    env = {**aws_env, "AWS_ENDPOINT_URL": s3_faults.url,
           "VIDQ_STORAGE_URL": f"s3://{bucket}/night", "VIDQ_MAX_IN_FLIGHT": "2",
           "VIDQ_MAX_ATTEMPTS": "2"}
    pipeline = make_pipeline(make_sandbox(), **env)
    pipeline.start_workers()
    revoked = s3_faults.fail(lambda request: True, status=403, count=10**6)
    night = [f"night one, take {i}" for i in range(6)]
    pipeline.enqueue(write_prompts(tmp_path / "b1.txt", night), "b1")
    assert pipeline.wait_finished("b1", timeout_s=240)["failed"] == len(night)
    revoked.count = 0
    pipeline.enqueue(write_prompts(tmp_path / "b0.txt", ["morning, take 0"]), "b0")
    assert pipeline.wait_finished("b0", timeout_s=60)["done"] == 1
    s3_faults.fail(lambda request: request.method in ("PUT", "POST"), status=507, count=10**6)
    retried = subprocess.run(["vidq", "retry", "b1"], env=pipeline.env, capture_output=True,
                             text=True, timeout=60)
    assert retried.returncode == 0, retried.stderr
    wait_until(lambda: pipeline.store.redis.exists(keys.STORAGE_FAILING), 60,
               "storage failing noticed")
    time.sleep(10)  # several of the jobs' pauses

    bought = Counter(entry["prompt"] for entry in pipeline.ledger())
    assert sum(bought[prompt] for prompt in night) < len(night), bought
    assert pipeline.store.redis.exists(keys.STORAGE_FAILING)


@pytest.mark.slow
def test_one_batchs_denied_prefix_fails_its_own_jobs_and_stalls_no_other(
        make_pipeline, make_sandbox, aws_env, s3, bucket, s3_faults, tmp_path):  # noqa: F811
    """A bucket policy denies batch `denied`'s prefix (403 to everything under
    it): its jobs' resume checks fail. Once each has paused submits three
    times, the store is asked (an empty object at the prefix's root) and
    takes it: the error is the batch's, so its jobs spend attempts and fail,
    unpaid, while batch `ok` is bought and stored. (Reading every 403 as the
    store's kept both batches paused, `denied` queued for ever; review 110.)"""
    env = {**aws_env, "AWS_ENDPOINT_URL": s3_faults.url,
           "VIDQ_STORAGE_URL": f"s3://{bucket}/night", "VIDQ_MAX_IN_FLIGHT": "2",
           "VIDQ_MAX_ATTEMPTS": "3"}
    pipeline = make_pipeline(make_sandbox(), **env)
    s3_faults.fail(lambda request: "/night/denied/" in request.path, status=403, count=10**6)
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "d.txt", ["denied 0", "denied 1"]), "denied")
    ok = [f"ok {i}" for i in range(6)]
    pipeline.enqueue(write_prompts(tmp_path / "o.txt", ok), "ok")

    assert pipeline.wait_finished("denied", timeout_s=120)["failed"] == 2
    assert pipeline.wait_finished("ok", timeout_s=120)["done"] == len(ok)
    assert Counter(entry["prompt"] for entry in pipeline.ledger()) == Counter(ok)
    failures = [pipeline.store.get(keys.job_ref("denied", job_id)).extra["last_error"]
                for job_id in pipeline.store.job_ids("denied")]
    assert all("403: Forbidden" in failure for failure in failures), failures


def test_a_video_stored_before_its_sidecar_failed_is_not_fetched_again(
        make_pipeline, aws_env, s3, bucket, s3_faults, tmp_path):  # noqa: F811
    """The video lands whole, its sidecar's PUT fails, and by the retry the
    upstream no longer serves the result: the retry writes the sidecar from
    the stored video, and the job is done."""
    env = {**aws_env, "AWS_ENDPOINT_URL": s3_faults.url,
           "VIDQ_STORAGE_URL": f"s3://{bucket}/night"}
    pipeline = make_pipeline(**env)
    sidecars = s3_faults.fail(
        lambda request: request.method == "PUT" and request.path.endswith(".json"),
        status=503, count=6)  # two StorageErrors: botocore tries 3 times
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", PROMPTS[:1]), "b1")
    deadline = time.monotonic() + 60
    while not any(key.endswith(".mp4") for key in _keys(s3, bucket)):
        assert time.monotonic() < deadline, "the video never landed"
        time.sleep(0.02)
    pipeline.faults(download=[404] * 100)  # the upstream no longer serves it

    assert pipeline.wait_finished("b1", timeout_s=60)["done"] == 1
    assert sidecars.hits == 6
    [generation] = pipeline.ledger()
    [job_id] = pipeline.store.job_ids("b1")
    video = s3.get_object(Bucket=bucket, Key=f"night/b1/{job_id}.mp4")["Body"].read()
    card = json.loads(s3.get_object(Bucket=bucket, Key=f"night/b1/{job_id}.json")["Body"].read())
    assert hashlib.sha256(video).hexdigest() == card["sha256"] == generation["sha256"]
    assert generation["downloads"] == 1


def test_a_recovered_submit_is_not_held_by_a_storage_check_that_cannot_answer(
        steps_for, aws_env, bucket, s3_faults, monkeypatch):  # noqa: F811
    """A worker died mid-POST (its marker written, the answer never read), and
    storage throttles every HEAD when the submit is sent again: the marker
    decides, at once: outcome unknown, its slot held (the POST may be
    generating). It was retried on the storage error 8 times, then failed as a
    plain error with its slot freed: C = 1 passed (review 24)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_faults.url)
    s3_faults.fail(lambda request: request.method == "HEAD", status=503, count=10**6)
    steps = steps_for(VIDQ_STORAGE_URL=f"s3://{bucket}/night")
    ref, token = _admit_one(steps)
    steps.store.redis.hset(keys.job(ref), "posting_at", repr(time.time() - 5))

    tasks._run(steps, "submit", steps.claim(ref, token, "submit"))

    record = steps.store.get(ref)
    assert record.state == "failed" and record.extra.get("outcome_unknown") == "1"
    assert steps.admission.in_flight() == 1


def test_a_worker_starts_while_its_storage_never_answers(make_pipeline, aws_env, bucket):  # noqa: F811
    """An S3 endpoint that accepts connections and never answers: the start-up
    storage check must not hold the worker's start (it took 183 s: three 60 s
    reads), nor its heartbeat."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent.listen(16)
        port = silent.getsockname()[1]
        pipeline = make_pipeline(**{**aws_env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                                    "VIDQ_STORAGE_URL": f"s3://{bucket}/night"})
        started = time.monotonic()
        pipeline.start_workers()

        assert time.monotonic() - started < 30
        assert pipeline.store.redis.zcard(keys.WORKERS) == 1

