"""Download one video in this process and report time and RSS growth.

    python -m bench.download_probe plain URL TARGET_FILE
    python -m bench.download_probe plain-fsync URL TARGET_FILE   (plain, then fsync)
    python -m bench.download_probe vidq URL STORAGE_DIR   (env: VIDQ_REDIS_URL,
        AIMLAPI_BASE_URL, AIMLAPI_KEY; runs the real `Steps.download`)
    python -m bench.download_probe vidq-nofsync URL STORAGE_DIR   (diagnosis only:
        the same with storage fsyncs turned into no-ops, to price durability)
    python -m bench.download_probe vidq-s3 URL s3://BUCKET/PREFIX   (the real
        `Steps.download` into S3; also env AWS_ENDPOINT_URL and credentials;
        the multipart part size is VIDQ_S3_PART_BYTES, default 8 MiB)
Prints one JSON line: bytes, seconds, rss_before, rss_peak. The peak is the
kernel's high-water mark VmHWM of this process image (ru_maxrss would carry
over the RSS of the forking parent across exec).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import psutil
import requests

from .config import MODEL

CHUNK = 1 << 20


def plain_copy(url: str, target: str, durable: bool = False) -> int:
    size = 0
    with requests.get(url, stream=True, timeout=60) as response, open(target, "wb") as out:
        response.raise_for_status()
        for chunk in response.iter_content(CHUNK):
            out.write(chunk)
            size += len(chunk)
        if durable:
            out.flush()
            os.fsync(out.fileno())
    return size


def prepare_vidq(url: str, storage: str):
    """Steps for this process and a job record ready for its download step.
    `storage` is a directory, or an s3:// URL used as is. The backend (for S3,
    boto3 and its client) is built here, before the RSS baseline is taken."""
    is_s3 = storage.startswith("s3://")
    os.environ["VIDQ_STORAGE_URL"] = storage if is_s3 else Path(storage).resolve().as_uri()
    from worker.settings import Settings
    from worker.tasks import build_steps

    steps = build_steps(Settings.from_env())
    now = time.time()
    record = {"id": "big", "batch": "dl", "state": "downloading", "token": "t1",
              "step": "download", "video_url": url, "generation_id": "g",
              "request": json.dumps({"model": MODEL, "prompt": "a 200 MB video"}),
              "submitted_at": repr(now), "completed_at": repr(now)}
    steps.store.redis.hset("vidq:job:dl:big", mapping=record)
    return steps, steps.store.get("dl:big")


def disable_storage_fsync() -> None:
    import worker.storage

    worker.storage.os = _NoFsyncOs()
    worker.storage.fsync_dir = lambda directory: None


class _NoFsyncOs:
    """`os` for worker.storage with fsync a no-op (this process only)."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def fsync(fd) -> None:
        return None


def vidq_download(steps, job) -> int:
    steps.download(job)
    done = steps.store.get(job.ref)
    if done.state != "done":
        raise RuntimeError(f"vidq download ended in state {done.state}")
    return int(done.extra["bytes"])


def high_water_rss() -> int:
    """Peak resident set size of this process image, in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(mode: str, url: str, target: str) -> dict:
    if mode == "vidq-nofsync":
        disable_storage_fsync()
    if mode.startswith("vidq"):
        steps, job = prepare_vidq(url, target)
        run = lambda: vidq_download(steps, job)  # noqa: E731
    else:
        run = lambda: plain_copy(url, target, durable=mode == "plain-fsync")  # noqa: E731
    rss_before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    size = run()
    seconds = time.perf_counter() - started
    rss_peak = high_water_rss()
    return {"mode": mode, "bytes": size, "seconds": seconds,
            "rss_before": rss_before, "rss_peak": rss_peak}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
