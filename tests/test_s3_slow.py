"""A slow S3 endpoint on real parts (moto's server behind a proxy that answers
each UploadPart late, real workers, the sandbox over HTTP behind the chaos
fault proxy). Review 140: the download uploaded each part as it filled, so
it stopped reading the result while S3 was slow; a result host that drops a
client reading nothing for a while cut every try, and the paid video was
never stored. And a pool child killed mid-upload left its multipart upload
open, its parts billed, for good."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import psutil
import pytest
from chaos.faultproxy import FaultProxy
from conftest import wait_until, write_prompts
from s3faults import S3FaultProxy
from test_s3 import aws_env, bucket, s3, s3_endpoint  # noqa: F401 - fixtures

from worker import keys

MiB = 1024 * 1024


class SlowPartsS3(S3FaultProxy):
    """Each UploadPart answered `part_delay_s` late (a congested MinIO, or an
    UploadPart that hung until botocore's read timeout and was tried again)."""

    part_delay_s = 0.0

    def _handle(self, handler):
        if "partNumber=" in handler.path:
            time.sleep(self.part_delay_s)
        super()._handle(handler)


@pytest.fixture
def slow_s3(s3_endpoint):  # noqa: F811
    proxy = SlowPartsS3(s3_endpoint)
    yield proxy
    proxy.stop()


def _stored(pipeline, s3, bucket: str, batch: str) -> None:  # noqa: F811
    (job_id,) = pipeline.store.job_ids(batch)
    job = pipeline.store.get(keys.job_ref(batch, job_id))
    body = s3.get_object(Bucket=bucket, Key=f"v/{batch}/{job_id}.mp4")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == job.extra["sha256"]
    assert [entry["id"] for entry in pipeline.ledger()] == [job.generation_id]  # one POST


@pytest.mark.slow
def test_a_slow_s3_never_stalls_the_result_download_behind_a_cdn_with_a_send_timeout(
        make_pipeline, make_sandbox, aws_env, s3, bucket, slow_s3, tmp_path):  # noqa: F811
    """The result host drops a client that reads nothing for 3 s (nginx's
    send_timeout, 60 s by default); S3 takes 5 s a part. The video is read
    whole at the network's pace, then uploaded: stored on its first try."""
    sandbox = make_sandbox(pad_video_to=12 * MiB)
    cdn = FaultProxy(sandbox.url, seed=1, rewrite_urls=True, timeout_s=3).start()
    try:
        pipeline = make_pipeline(sandbox, AIMLAPI_BASE_URL=cdn.url,
                                 VIDQ_STORAGE_URL=f"s3://{bucket}/v",
                                 VIDQ_S3_PART_BYTES=str(5 * MiB), VIDQ_DOWNLOAD_GRACE_S="60",
                                 **{**aws_env, "AWS_ENDPOINT_URL": slow_s3.url})
        slow_s3.part_delay_s = 5.0
        pipeline.start_workers(1, concurrency=2)
        pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["a slow fox"]), "slow")
        assert pipeline.wait_finished("slow", timeout_s=90)["done"] == 1
        _stored(pipeline, s3, bucket, "slow")
        assert sandbox.stats()["downloads"] == 1  # fetched once
        assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    finally:
        cdn.stop()


@pytest.mark.slow
def test_a_pool_child_killed_mid_multipart_leaves_no_upload_open(
        make_pipeline, make_sandbox, aws_env, s3, bucket, slow_s3, tmp_path):  # noqa: F811
    """The pool child is SIGKILLed (the OOM killer) while its upload's parts
    go up. The step sent again stores the video, and aborts the upload the
    dead child could not."""
    pipeline = make_pipeline(make_sandbox(pad_video_to=12 * MiB),
                             VIDQ_STORAGE_URL=f"s3://{bucket}/v",
                             VIDQ_S3_PART_BYTES=str(5 * MiB),
                             **{**aws_env, "AWS_ENDPOINT_URL": slow_s3.url})
    slow_s3.part_delay_s = 2.0
    pipeline.start_workers(1, concurrency=2)
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["a big fox"]), "big")
    wait_until(lambda: s3.list_multipart_uploads(Bucket=bucket).get("Uploads"), 90,
               "a multipart upload under way", 0.05)
    for child in psutil.Process(pipeline.processes[0].pid).children():
        child.kill()
    slow_s3.part_delay_s = 0.0
    assert pipeline.wait_finished("big", timeout_s=120)["done"] == 1
    _stored(pipeline, s3, bucket, "big")
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert uploads == [], [(u["Key"], u["UploadId"]) for u in uploads]


def test_a_full_spool_disk_is_a_storage_error_even_in_small_pieces(tmp_path):
    """The temporary file a video is spooled to cannot grow (here the
    process's file size limit; a full $TMPDIR says ENOSPC the same way) while
    the result arrives a TCP segment at a time. The write's StorageError
    was replaced by the abort's close, whose flush of the buffered tail
    failed again: an "unexpected" OSError, which paused no storage (review
    141). The writer must end with the StorageError."""
    code = """if True:
        import resource, signal
        from worker.errors import StorageError
        from worker.storage_s3 import S3Storage
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        storage = S3Storage("b", client=object(), part_bytes=64 * 1024)
        try:
            with storage.writer("night/j.mp4") as out:
                for _ in range(2000):
                    out.write(b"x" * 1448)
        except StorageError as exc:
            print("StorageError:", exc)
        """
    answer = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.startswith("StorageError: cannot spool s3://b/night/j.mp4 to "), answer
