"""Storage that cannot take videos stops new POSTs; paid videos wait for it.
Real workers, Redis and the sandbox; local storage whose root cannot be made
(a file stands where its directory goes), then can."""
from __future__ import annotations

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


def test_the_store_is_asked_whether_it_takes_videos_now(tmp_path):
    """Storage.probe, asked once a job has paused submits three times: a disk
    with room and a working file system takes it; one with less free than a
    disk needs to take videos (on the real statvfs, the bar set above it),
    or a root that is no directory, refuses it with a reason `vidq status`
    can show."""
    from worker.errors import StorageError
    from worker.storage import MIN_FREE_BYTES, FileStorage

    FileStorage(tmp_path / "videos").probe()
    assert [p.name for p in (tmp_path / "videos").iterdir()] == []  # nothing left behind
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    assert free > MIN_FREE_BYTES  # this machine's disk has room: the bar is what refuses
    with pytest.raises(StorageError, match=r"MiB free, under the .* MiB a disk needs"):
        FileStorage(tmp_path / "videos", min_free_bytes=free * 2).probe()
    (tmp_path / "blocked").write_text("a file where the root goes")
    with pytest.raises(StorageError, match="cannot create"):
        FileStorage(tmp_path / "blocked" / "videos").probe()
