"""Storage that cannot take videos stops new POSTs; paid videos wait for it.
Real workers, Redis and the sandbox; local storage whose root cannot be made
(a file stands where its directory goes), then can."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from collections import Counter

import pytest
from conftest import wait_until, write_prompts

from worker import keys

PROMPTS = [f"a lighthouse at dusk, take {i}" for i in range(8)]


@pytest.mark.slow
def test_storage_failing_stops_new_posts_and_every_paid_video_lands_once_it_works(
        make_pipeline, make_sandbox, tmp_path):
    """The videos' directory cannot be created: the first completed videos fail
    to store, submits pause for every worker (renewed while it fails), `vidq
    status` says why with no ETA, and the prompts not yet sent wait unpaid.
    Once the directory can be made, every video lands, each prompt POSTed once.
    (Before, the whole batch was bought while nothing could be stored.)"""
    blocked = tmp_path / "disk"
    blocked.write_text("a file where the videos' directory goes")
    # Pauses of 10 s, renewed by retries ~1, 2 and 4 s apart: each paid job's
    # three (storage_pause.PAUSES_PER_JOB) outlast the 6 s looked at.
    pipeline = make_pipeline(make_sandbox(max_concurrency=0), VIDQ_MAX_IN_FLIGHT=2,
                             VIDQ_STORAGE_URL=(blocked / "videos").as_uri(),
                             VIDQ_BACKOFF_BASE_S="1", VIDQ_BACKOFF_CAP_S="10")
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", PROMPTS), "night")

    wait_until(lambda: pipeline.store.redis.exists(keys.STORAGE_FAILING), 60,
               "storage failing noticed")
    status = subprocess.run(["vidq", "status", "night"], env=pipeline.env,
                            capture_output=True, text=True, timeout=60)
    posted = len(pipeline.ledger())
    time.sleep(6)
    still_posted = len(pipeline.ledger())
    blocked.unlink()
    counts = pipeline.wait_finished("night", timeout_s=120)

    assert still_posted == posted < len(PROMPTS), (posted, still_posted)
    assert "storage failing (" in status.stdout and "no new POSTs until it works" in status.stdout
    assert "ETA unknown (storage failing)" in status.stdout
    assert counts["done"] == len(PROMPTS), counts
    assert Counter(entry["prompt"] for entry in pipeline.ledger()) == Counter(PROMPTS)
    assert len(list((tmp_path / "disk" / "videos" / "night").glob("*.mp4"))) == len(PROMPTS)


@pytest.mark.slow
def test_one_jobs_own_storage_error_stalls_neither_the_batch_nor_the_deployment(
        make_pipeline, make_sandbox, tmp_path):
    """p0's sidecar is a symlink that leaves the storage root: its resume check
    fails, and only p0's. It pauses submits a few times, then is retried like
    any failure and ends failed; the other jobs are POSTed and done. (Put back
    at the front of its line each time, it stopped every POST for good: h37.)"""
    root = tmp_path / "videos"
    (root / "night").mkdir(parents=True)
    (tmp_path / "elsewhere.json").write_text("{}")
    (root / "night" / "p0.json").symlink_to(tmp_path / "elsewhere.json")
    rows = [{"id": f"p{i}", "prompt": f"a red kite over dunes, take {i}"} for i in range(4)]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    pipeline = make_pipeline(make_sandbox(), VIDQ_MAX_IN_FLIGHT=1, VIDQ_MAX_ATTEMPTS=3,
                             VIDQ_STORAGE_URL=root.as_uri())
    pipeline.start_workers()
    pipeline.enqueue(prompts, "night")

    counts = pipeline.wait_finished("night", timeout_s=90)

    assert (counts["done"], counts["failed"]) == (3, 1), counts
    assert "leaves the storage root" in pipeline.store.get("night:p0").last_error
    assert sorted(entry["prompt"] for entry in pipeline.ledger()) == [
        row["prompt"] for row in rows[1:]]


def test_errors_of_the_whole_store_are_told_from_one_objects(tmp_path):
    """Full, over quota, read-only, failing or lost file systems, a root that
    is no directory, and S3's 5xx (MinIO's full disk is a 507), refused
    credentials, a missing bucket or no answer keep submits paused while they
    last; one object's error (a name too long, a key refused) pauses only a
    few times (storage_pause.PAUSES_PER_JOB)."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    from worker.errors import StorageError, StorageUnavailable
    from worker.storage import storage_error
    from worker.storage_s3 import _whole_store

    def local(code: int, root=tmp_path) -> StorageError:
        return storage_error("cannot write v/a.mp4", OSError(code, os.strerror(code)), root)

    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ESTALE):
        assert isinstance(local(code), StorageUnavailable), code
    for code in (errno.ENAMETOOLONG, errno.EACCES, errno.ENOENT):
        assert type(local(code)) is StorageError, code
    assert isinstance(local(errno.ENOENT, tmp_path / "unmounted"), StorageUnavailable)
    assert str(local(errno.ENOSPC)) == "cannot write v/a.mp4: No space left on device"

    def s3(status: int, code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    for status, code in ((507, "XMinioStorageFull"), (503, "SlowDown"), (500, "InternalError"),
                         (403, "AccessDenied"), (403, "InvalidAccessKeyId"),
                         (404, "NoSuchBucket")):
        assert _whole_store(s3(status, code)), code
    assert _whole_store(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    for status, code in ((400, "EntityTooLarge"), (400, "KeyTooLongError"), (404, "NoSuchKey")):
        assert not _whole_store(s3(status, code)), code
