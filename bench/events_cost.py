"""What the event stream costs (a private Redis, fsync always, as in tests).

    python -m bench.events_cost [JOBS]

Moves JOBS (default 5,000) jobs into `failed` one by one, once with the plain
transition script and once with the announcing one (lua/transition.lua inside
the event after-step), three times each; then fills a stream with 20,000
video events of realistic size. Prints one JSON line: microseconds per final
transition with and without the event (medians of 3), and Redis bytes per
job.failed and per video.stored entry.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

from producer.redis_server import PrivateRedis
from worker import keys
from worker.jobs import Job, JobStore, State, load_script

REASON = "generation: upstream said the prompt was refused (" + "x" * 24 + ")"


def transitions_us(client: redis.Redis, jobs: int, announce: bool, batch: str) -> float:
    store = JobStore(client)
    if not announce:
        store._scripts["transition"] = load_script(client, "transition")
    pipe = client.pipeline(transaction=False)
    for i in range(jobs):
        pipe.hset(keys.job(keys.job_ref(batch, f"j{i}")), mapping={
            "id": f"j{i}", "batch": batch, "request": "{}", "state": "generating",
            "token": "t"})
    pipe.execute()
    todo = [Job(batch=batch, id=f"j{i}", request={}, state="generating", token="t")
            for i in range(jobs)]
    started = time.perf_counter()
    for job in todo:
        store.transition(job, state=State.FAILED, release_slot=True, last_error=REASON)
    return (time.perf_counter() - started) / jobs * 1e6


def video_event_bytes(client: redis.Redis, count: int = 20_000) -> float:
    client.delete(keys.EVENTS)
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        digest = hashlib.sha256(str(i).encode()).hexdigest()
        pipe.xadd(keys.EVENTS, {
            "v": "1", "type": "video.stored", "at": "1764100000.123456", "batch": "night-1",
            "job": f"night-1:{digest[:16]}", "custom_id": digest[:16],
            "generation_id": "gen-" + digest[:24],
            "storage_url": f"s3://videos/prefix/night-1/{digest[:16]}.mp4", "sha256": digest,
            "bytes": "5242880", "credits_used": "120000"})
    pipe.execute()
    return int(client.memory_usage(keys.EVENTS) or 0) / count


def measure(jobs: int) -> dict:
    with tempfile.TemporaryDirectory() as state, PrivateRedis(Path(state)) as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        plain, announced = [], []
        for run in range(3):
            client.flushdb()
            plain.append(transitions_us(client, jobs, False, f"p{run}"))
            client.flushdb()
            announced.append(transitions_us(client, jobs, True, f"a{run}"))
        failed_bytes = int(client.memory_usage(keys.EVENTS) or 0) / client.xlen(keys.EVENTS)
        return {"jobs": jobs, "transition_us": round(statistics.median(plain)),
                "transition_with_event_us": round(statistics.median(announced)),
                "bytes_per_failed_event": round(failed_bytes),
                "bytes_per_video_event": round(video_event_bytes(client))}


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)))
