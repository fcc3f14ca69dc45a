"""Scenario 3: the real vidq workers, fed by `producer.enqueue.enqueue_file`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from worker.celery_app import QUEUES
from worker.keys import batch_counts as counts_key
from worker.keys import job as job_key
from worker.keys import job_ref

from . import infra
from .config import BenchConfig
from .metrics import Row, build_row, cycle_breakdown, detection_lag

BATCH = "bench"


def vidq_env(cfg: BenchConfig, redis_url: str, server, storage: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VIDQ_") and k not in ("AIML_API_KEY", "AIMLAPI_KEY")}
    t = cfg.generation_s
    env.update({
        "VIDQ_REDIS_URL": redis_url, "AIMLAPI_BASE_URL": server.url,
        "AIMLAPI_KEY": infra.SANDBOX_KEY, "VIDQ_MAX_IN_FLIGHT": str(cfg.c),
        "VIDQ_EXPECTED_GENERATION_S": repr(t),
        "VIDQ_POLL_MIN_INTERVAL_S": repr(0.02 * t),
        "VIDQ_POLL_MAX_INTERVAL_S": repr(4 * t),
        "VIDQ_STORAGE_URL": storage.resolve().as_uri(),
    })
    return env


def run_enqueue(env: dict, path: Path, batch: str) -> dict:
    command = [sys.executable, "-m", "bench.enqueue_probe", str(path), batch]
    done = subprocess.run(command, env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    if done.returncode:
        raise RuntimeError(f"enqueue failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def wait_batch(probe: infra.RedisProbe, total: int, stall_s: float) -> dict:
    last, last_change = None, time.monotonic()
    while True:
        counts = {k: int(v) for k, v in probe.call("hgetall", counts_key(BATCH)).items()}
        finished = counts.get("done", 0) + counts.get("failed", 0)
        if finished >= total:
            return counts
        if counts != last:
            last, last_change = counts, time.monotonic()
        if time.monotonic() - last_change > stall_s:
            raise RuntimeError(f"vidq run stalled: {counts}")
        time.sleep(0.2)


def read_jobs(client, ids: list[str]) -> list[dict]:
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.hgetall(job_key(job_ref(BATCH, job_id)))
    return pipe.execute()


def run_vidq(cfg: BenchConfig, work: Path, logs: Path, processes: int, concurrency: int) -> Row:
    label = f"{processes}x{concurrency}"
    storage = work / f"vidq-videos-{label}"
    prompts = infra.write_prompts(work / f"vidq-{label}.txt", cfg.n, f"vidq-{label}")
    with infra.private_redis(work / f"redis-vidq-{label}") as redis_server, \
            infra.sandbox(cfg.time_scale, cfg.c) as server:
        env = vidq_env(cfg, redis_server.url, server, storage)
        workers = []
        try:
            for index in range(processes):
                workers.append(infra.start_celery(
                    "worker", ",".join(QUEUES), concurrency, f"vidq{index}", env,
                    logs / f"vidq-{label}-worker{index}.log"))
            with infra.RssSampler([w.pid for w in workers]) as rss:
                probe = infra.RedisProbe(redis_server.url)
                meter = infra.CommandMeter(probe)
                meter.start()
                enqueued = run_enqueue(env, prompts, BATCH)
                counts = wait_batch(probe, enqueued["created"], max(60.0, 20 * cfg.generation_s))
                calls = meter.stop()
                by_command = probe.calls_by_command()
        finally:
            infra.stop_celery(workers)
        jobs = read_jobs(probe.client, sorted(probe.client.smembers(f"vidq:batch:{BATCH}:jobs")))
        entries, stats = infra.ledger(server), infra.stats(server)
    shutil.rmtree(storage, ignore_errors=True)
    stored = [float(j["downloaded_at"]) for j in jobs if j.get("state") == "done"]
    row = build_row(f"vidq ({label})", cfg.n, cfg.c, entries, stats, stored, rss.peak_bytes,
                    calls, note=f"{processes} worker process(es) x -c {concurrency}")
    row.failed = counts.get("failed", 0)
    row.extra.update(detection_lag=detection_lag(jobs, entries, cfg.generation_s),
                     cycle=cycle_breakdown(jobs, entries, cfg.c),
                     counts=counts, commands_by_name=_top(by_command, 15),
                     vidq_polls=_poll_summary(jobs), sandbox_stats=stats)
    return row


def _top(counts: dict[str, int], limit: int) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:limit])


def _poll_summary(jobs: list[dict]) -> dict:
    polls = sorted(int(j.get("polls") or 0) for j in jobs)
    return {str(p): polls.count(p) for p in sorted(set(polls))}
