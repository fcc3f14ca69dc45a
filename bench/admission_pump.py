"""How long one admission takes behind a big backlog (a private Redis).

    python -m bench.admission_pump [JOBS]

Enqueues JOBS (default 100,000) jobs into batch `big` and 3 into `small`
(no workers: nothing is POSTed), then frees one slot at a time and times
each pump call that admits one job at C = 1. Prints one JSON line: enqueue
seconds, the median and maximum pump milliseconds, the order in which the
first 8 admissions took batches, and Redis's used memory per waiting job.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from producer.redis_server import PrivateRedis
from worker import keys
from worker.admission import Admission
from worker.connection import connect
from worker.jobs import JobStore

REQUEST = {"model": "alibaba/wan2.1-t2v-turbo", "prompt": "p"}


def measure(jobs: int) -> dict:
    with tempfile.TemporaryDirectory() as state, PrivateRedis(Path(state)) as server:
        admission = Admission(JobStore(connect(server.url)), 90.0)
        client = admission.redis
        before = int(client.info("memory")["used_memory"])
        started = time.perf_counter()
        admission.enqueue("big", ((f"j{i}", {**REQUEST, "prompt": f"p{i}"})
                                  for i in range(jobs)), time.time())
        enqueue_s = time.perf_counter() - started
        per_job = (int(client.info("memory")["used_memory"]) - before) / jobs
        admission.enqueue("small", ((f"s{i}", REQUEST) for i in range(3)), time.time())
        admission.set_cap(1)
        order, times = [], []
        for _ in range(50):
            started = time.perf_counter()
            admitted = admission.pump()
            times.append((time.perf_counter() - started) * 1000)
            (ref, _token), = admitted
            order.append(ref.split(":")[0])
            client.zrem(keys.SLOTS, ref)  # the generation ended: its slot is free
        return {"jobs": jobs, "enqueue_s": round(enqueue_s, 2),
                "pump_ms_median": round(statistics.median(times), 3),
                "pump_ms_max": round(max(times), 3), "first_8": order[:8],
                "redis_bytes_per_job": round(per_job)}


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)))
