"""What batch operations cost on a big batch (issue 13): retry, status,
manifest and purge on 100,000 jobs, in a private Redis.

    python -m bench.batch_ops [--jobs 100000]

The batch is enqueued straight into the admission (no worker runs), three
jobs are failed, then: `vidq retry` and `vidq status --json` as processes
(wall time includes Python's start-up; Redis commands counted from INFO
stats), the manifest written for every job to file storage, and the batch
purged (Redis used_memory before and after, once lazy freeing has run).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from producer.enqueue import open_admission
from producer.redis_server import PrivateRedis
from worker import keys, manifest
from worker.jobs import State
from worker.retention import purge
from worker.settings import Settings
from worker.storage import open_storage

FAILED = ("j000007", "j050000", "j099999")


def timed_vidq(client, url: str, *args: str) -> tuple[float, int, str]:
    """(seconds, Redis commands, stdout) of one `vidq` process."""
    before = int(client.info("stats")["total_commands_processed"])
    started = time.monotonic()
    done = subprocess.run(["vidq", *args], env={**os.environ, "VIDQ_REDIS_URL": url},
                          capture_output=True, text=True, check=True)
    took = time.monotonic() - started
    return took, int(client.info("stats")["total_commands_processed"]) - before, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100_000)
    jobs = parser.parse_args().jobs
    with PrivateRedis(Path(tempfile.mkdtemp())) as server:
        admission = open_admission(Settings.from_env({"VIDQ_REDIS_URL": server.url}))
        store, client = admission.store, admission.redis
        admission.enqueue("big", [(f"j{i:06d}", {"model": "alibaba/wan2.1-t2v-turbo",
                                                 "prompt": f"a red fox number {i} at dawn"},
                                   {"line": i + 1}) for i in range(jobs)], time.time())
        for job_id in FAILED:
            store.transition(store.get(keys.job_ref("big", job_id)), state=State.FAILED,
                             expected_token="*", last_error="poll: blocked term")
        took, used, out = timed_vidq(client, server.url, "retry", "big")
        print(f"vidq retry, 3 failures of {jobs:,}: {took:.2f} s, {used} Redis commands "
              f"({out.strip()})")
        took, used, _ = timed_vidq(client, server.url, "status", "big", "--json")
        print(f"vidq status --json: {took:.2f} s, {used} Redis commands")
        root = Path(tempfile.mkdtemp())
        started = time.monotonic()
        rows, _ = manifest.write(client, open_storage(root.as_uri(), 8 << 20), root.as_uri(),
                                 "big")
        size = (root / manifest.manifest_key("big")).stat().st_size
        print(f"manifest: {rows:,} rows, {size / 1e6:.1f} MB in "
              f"{time.monotonic() - started:.1f} s")
        memory = client.info("memory")["used_memory"]
        started = time.monotonic()
        purged = purge(client, "big", Settings.from_env({"VIDQ_REDIS_URL": server.url}))
        took = time.monotonic() - started
        time.sleep(2)  # UNLINK frees in the background
        print(f"purge: {purged.jobs:,} jobs, {purged.keys:,} keys in {took:.2f} s; "
              f"used_memory {memory / 1e6:.1f} MB -> "
              f"{client.info('memory')['used_memory'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
