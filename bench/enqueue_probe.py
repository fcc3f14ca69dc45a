"""Enqueue a prompt file the way `vidq enqueue` does, in its own process (so
each scenario's private Redis gets a producer with a fresh connection pool).

    VIDQ_REDIS_URL=... python -m bench.enqueue_probe FILE BATCH
Prints one JSON line: {"seconds": ..., "created": ..., "jobs_in_file": ...}.
"""
from __future__ import annotations

import json
import sys
import time

import worker
from producer.enqueue import enqueue_file, open_admission
from worker.celery_app import apply_settings
from worker.settings import Settings
from worker.tasks import dispatch

from .config import MODEL


def main(path: str, batch: str) -> dict:
    settings = Settings.from_env()
    apply_settings(worker.app, settings)
    admission = open_admission(settings)
    admission.redis.ping()
    started = time.perf_counter()
    result = enqueue_file(admission, path, batch, {"model": MODEL}, dispatch)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "created": result.created, "jobs_in_file": result.jobs_in_file,
            "enqueued_at": time.time()}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
