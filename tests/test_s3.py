"""The S3 backend against a real S3 HTTP endpoint: moto's server on 127.0.0.1,
reached by boto3 through the standard AWS environment (AWS_ENDPOINT_URL,
credentials, region), with real `celery -A worker worker` processes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import socket
import time
import uuid

import boto3
import pytest
import redis
from conftest import wait_until, write_prompts
from moto.server import ThreadedMotoServer

from worker import keys
from worker.errors import ConfigError, StorageError
from worker.settings import Settings
from worker.storage import open_storage
from worker.storage_s3 import S3Storage

MiB = 1024 * 1024
PROMPTS = [f"a paper boat on a river, take {n}" for n in range(6)]


@pytest.fixture(scope="session")
def s3_endpoint():
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(s3_endpoint, monkeypatch):
    """The standard AWS environment, for this process (producer side) and workers."""
    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3(aws_env):
    return boto3.client("s3")


@pytest.fixture
def bucket(s3):
    name = f"vidq-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def _uploads(s3, bucket: str) -> list:
    return s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def _keys(s3, bucket: str) -> set[str]:
    return {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}


def _check_batch_in_s3(s3, bucket: str, prefix: str, batch: str, pipeline) -> None:
    """Every job's video and sidecar are there, hashes agree with the ledger; the
    batch's manifest (and its empty errors file) list every video by its URL."""
    ledger = {entry["id"]: entry["sha256"] for entry in pipeline.ledger()}
    job_ids = pipeline.store.job_ids(batch)
    assert len(job_ids) == len(PROMPTS)
    manifest = {f"{prefix}/{batch}/manifest.jsonl", f"{prefix}/{batch}/errors.jsonl"}
    deadline = time.monotonic() + 20  # written by the step that ended the last job
    while not manifest <= _keys(s3, bucket) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _keys(s3, bucket) == manifest | {f"{prefix}/{batch}/{job_id}.{ext}"
                                            for job_id in job_ids for ext in ("mp4", "json")}
    rows = [json.loads(line) for line in s3.get_object(
        Bucket=bucket, Key=f"{prefix}/{batch}/manifest.jsonl")["Body"].read().splitlines()]
    assert sorted(row["custom_id"] for row in rows) == job_ids
    for row in rows:
        assert row["storage_url"] == f"s3://{bucket}/{prefix}/{batch}/{row['custom_id']}.mp4"
        assert row["sha256"] == ledger[row["generation_id"]]
    errors = s3.get_object(Bucket=bucket, Key=f"{prefix}/{batch}/errors.jsonl")
    assert errors["Body"].read() == b"" and errors["ContentType"] == "application/x-ndjson"
    for job_id in job_ids:
        video = s3.get_object(Bucket=bucket, Key=f"{prefix}/{batch}/{job_id}.mp4")
        digest = hashlib.sha256(video["Body"].read()).hexdigest()
        card = json.loads(s3.get_object(Bucket=bucket,
                                        Key=f"{prefix}/{batch}/{job_id}.json")["Body"].read())
        assert digest == card["sha256"] == ledger[card["generation_id"]]
        assert card["video"] == f"{batch}/{job_id}.mp4"
        assert video["ContentType"] == "video/mp4"
        assert video["Metadata"] == {"job-id": job_id, "batch": batch, "sha256": digest}
    assert _uploads(s3, bucket) == []


def test_a_batch_lands_in_s3_whole_and_a_rerun_posts_nothing(
        make_pipeline, make_sandbox, redis_url, aws_env, s3, bucket, tmp_path):
    sandbox = make_sandbox()
    pipeline = make_pipeline(sandbox, VIDQ_STORAGE_URL=f"s3://{bucket}/night", **aws_env)
    pipeline.start_workers()
    prompts = write_prompts(tmp_path / "p.txt", PROMPTS)
    pipeline.enqueue(prompts, "b1")

    assert pipeline.wait_finished("b1", timeout_s=60)["done"] == len(PROMPTS)
    _check_batch_in_s3(s3, bucket, "night", "b1", pipeline)
    assert len(pipeline.ledger()) == len(PROMPTS)

    # Redis state lost: the resume rule finds every video in S3, no POST is sent.
    pipeline.stop_workers()
    redis.Redis.from_url(redis_url).flushdb()
    again = make_pipeline(sandbox, VIDQ_STORAGE_URL=f"s3://{bucket}/night", **aws_env)
    again.start_workers()
    again.enqueue(prompts, "b1")
    assert again.wait_finished("b1", timeout_s=60)["done"] == len(PROMPTS)
    assert len(again.ledger()) == len(PROMPTS)
    # The rerun's manifest (the reconciler's next pass) takes the place of the one
    # it found, which lists only these videos: not moved aside as an earlier batch's.
    wait_until(lambda: again.store.redis.hget(keys.batch("b1"), "manifest_of"), 30,
               "the rerun's manifest")
    _check_batch_in_s3(s3, bucket, "night", "b1", again)


def test_storage_missing_for_a_while_then_back(make_pipeline, aws_env, s3, tmp_path):
    """The worker says at start that the bucket is missing (before any video is
    paid for); uploads fail (NoSuchBucket -> StorageError) and are retried with
    backoff until the bucket appears; then every object lands and no upload is
    left open."""
    late = f"vidq-late-{uuid.uuid4().hex[:8]}"
    pipeline = make_pipeline(VIDQ_STORAGE_URL=f"s3://{late}/night", **aws_env)
    pipeline.start_workers()
    log = tmp_path / "logs" / "worker-0.log"
    wait_until(lambda: f"storage is not usable now: cannot reach s3://{late}" in log.read_text(),
               30, "the start-up storage check's error")
    assert "testing" not in log.read_text()  # the credentials
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", PROMPTS), "b2")

    deadline = time.monotonic() + 30
    while True:
        jobs = [pipeline.store.get(keys.job_ref("b2", j)) for j in pipeline.store.job_ids("b2")]
        if sum("NoSuchBucket" in job.last_error for job in jobs if job) >= 2:
            break
        assert time.monotonic() < deadline, "no upload failed for the missing bucket"
        time.sleep(0.2)
    assert pipeline.store.counts("b2")["done"] == 0
    s3.create_bucket(Bucket=late)

    assert pipeline.wait_finished("b2", timeout_s=60)["done"] == len(PROMPTS)
    _check_batch_in_s3(s3, late, "night", "b2", pipeline)


def test_a_failure_mid_upload_leaves_no_object_and_no_open_upload(s3, bucket):
    storage = S3Storage(bucket, "night", part_bytes=64 * 1024)
    with pytest.raises(RuntimeError), storage.writer("b/j.mp4") as out:
        out.write(b"\0" * (2 * 64 * 1024 + 100))  # over two parts: spooled, not sent yet
        raise RuntimeError("connection to the upstream dropped")
    assert out.upload_id is None and out.spool is not None and out.spool.closed
    assert _keys(s3, bucket) == set() and _uploads(s3, bucket) == []
    assert not storage.exists("b/j.mp4")


def test_a_multipart_upload_carries_type_and_metadata(s3, bucket):
    storage = S3Storage(bucket, "night", part_bytes=5 * MiB)
    data = bytes(range(256)) * (11 * MiB // 256 + 3)  # three parts
    with storage.writer("b/j.mp4") as out:
        for start in range(0, len(data), 1 * MiB + 7):
            out.write(data[start:start + 1 * MiB + 7])
    digest = hashlib.sha256(data).hexdigest()
    head = s3.head_object(Bucket=bucket, Key="night/b/j.mp4")
    assert head["ContentType"] == "video/mp4" and head["ContentLength"] == len(data)
    assert head["Metadata"] == {"job-id": "j", "batch": "b", "sha256": digest}
    assert storage.sha256("b/j.mp4") == digest
    assert storage.read_bytes("b/j.mp4") == data
    assert storage.location("b/j.mp4") == f"s3://{bucket}/night/b/j.mp4"
    assert _uploads(s3, bucket) == []


def test_small_objects_and_sha256_without_metadata(s3, bucket):
    storage = open_storage(f"s3://{bucket}/night", 8 * MiB)
    assert isinstance(storage, S3Storage) and storage.part_bytes == 8 * MiB
    storage.put_bytes("b/j.json", b'{"a": 1}')
    head = s3.head_object(Bucket=bucket, Key="night/b/j.json")
    assert head["ContentType"] == "application/json"
    assert head["Metadata"]["sha256"] == hashlib.sha256(b'{"a": 1}').hexdigest()
    # An object put by someone else, without metadata, is hashed from its bytes.
    s3.put_object(Bucket=bucket, Key="night/b/other.mp4", Body=b"plain bytes")
    assert storage.sha256("b/other.mp4") == hashlib.sha256(b"plain bytes").hexdigest()
    assert not storage.exists("b/missing.mp4")
    with pytest.raises(StorageError, match="NoSuchKey"):
        storage.read_bytes("b/missing.mp4")
    with pytest.raises(StorageError, match="leaves"):
        storage.location("../escape.mp4")


def test_move_keeps_bytes_type_and_metadata_and_is_false_when_nothing_is_there(s3, bucket):
    """A replaced video is set aside by a move: copied whole (type, sha256
    metadata), the old key gone; moving a key that is not there, or onto one
    that is, moves nothing."""
    storage = S3Storage(bucket, "night", part_bytes=5 * MiB)
    data = b"\0\0\0\x18ftypisom" + bytes(range(256)) * 40
    storage.put_bytes("b/j.mp4", data)
    assert storage.move("b/j.mp4", "b/replaced/j.g1.mp4")
    assert not storage.exists("b/j.mp4")
    head = s3.head_object(Bucket=bucket, Key="night/b/replaced/j.g1.mp4")
    assert head["ContentType"] == "video/mp4"
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert storage.read_bytes("b/replaced/j.g1.mp4") == data
    assert not storage.move("b/j.mp4", "b/replaced/j.g2.mp4")
    assert _keys(s3, bucket) == {"night/b/replaced/j.g1.mp4"}
    storage.put_bytes("b/j.mp4", b"another")  # never onto a video set aside before
    assert not storage.move("b/j.mp4", "b/replaced/j.g1.mp4")
    assert storage.read_bytes("b/replaced/j.g1.mp4") == data
    assert storage.read_bytes("b/j.mp4") == b"another"


def test_an_unreachable_endpoint_is_a_storage_error_without_secrets(aws_env, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage = open_storage("s3://nowhere/night", 8 * MiB)
    with pytest.raises(StorageError) as caught:
        storage.put_bytes("b/j.json", b"{}")
    assert "s3://nowhere/night/b/j.json" in str(caught.value)
    assert "testing" not in str(caught.value)


def test_part_size_setting_is_checked():
    with pytest.raises(ConfigError, match="VIDQ_S3_PART_BYTES"):
        Settings.from_env({"VIDQ_S3_PART_BYTES": str(4 * MiB)})
    assert Settings.from_env({"VIDQ_S3_PART_BYTES": str(5 * MiB)}).s3_part_bytes == 5 * MiB
    with pytest.raises(ConfigError, match="s3://bucket/prefix"):
        open_storage("s3:///no-bucket", 8 * MiB)


@pytest.mark.slow
def test_vidq_run_with_the_sandbox_into_s3(aws_env, s3, bucket, tmp_path):
    """`vidq run FILE --sandbox` with s3:// storage: every video and sidecar lands as an
    object whose sha256 matches, and no upload is left open."""
    import os
    import subprocess

    examples = write_prompts(tmp_path / "two.txt", PROMPTS[:2])
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIDQ_")}
    env.update(aws_env)
    env.update({"VIDQ_STORAGE_URL": f"s3://{bucket}/night", "VIDQ_MAX_IN_FLIGHT": "4",
                "VIDQ_POLL_MIN_INTERVAL_S": "0.2"})
    result = subprocess.run(["vidq", "run", str(examples), "--sandbox", "--batch", "ex",
                             "--state-dir", str(tmp_path / "state")],
                            env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    names = _keys(s3, bucket)
    videos = sorted(k for k in names if k.endswith(".mp4"))
    assert len(videos) == 2 and {k.replace(".mp4", ".json") for k in videos} <= names
    for key in videos:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        card = json.loads(s3.get_object(Bucket=bucket, Key=key[:-4] + ".json")["Body"].read())
        assert hashlib.sha256(body).hexdigest() == card["sha256"]
    assert _uploads(s3, bucket) == []
