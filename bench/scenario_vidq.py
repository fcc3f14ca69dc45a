"""Scenario 3: the real vidq workers, fed by `producer.enqueue.enqueue_file`."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from worker.celery_app import QUEUES
from worker.keys import batch_counts as counts_key
from worker.keys import job as job_key
from worker.keys import job_ref

from . import infra
from .config import (
    MEAN_GENERATION_S,
    POLL_MAX_INTERVAL_S,
    POLL_MIN_INTERVAL_S,
    PRIOR_GENERATION_S,
    BenchConfig,
)
from .metrics import Row, build_row, cycle_breakdown, detection_lag

BATCH = "bench"


def vidq_env(cfg: BenchConfig, redis_url: str, server, storage: Path) -> dict:
    """vidq's environment: production poll defaults, only sped up by the clock
    (divided by S). The true generation time is never passed: the prior is the
    default 90 simulated seconds whatever the sandbox's mean is."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VIDQ_") and k not in ("AIML_API_KEY", "AIMLAPI_KEY")}
    s = cfg.time_scale
    env.update({
        "VIDQ_REDIS_URL": redis_url, "AIMLAPI_BASE_URL": server.url,
        "AIMLAPI_KEY": infra.SANDBOX_KEY, "VIDQ_MAX_IN_FLIGHT": str(cfg.c),
        "VIDQ_EXPECTED_GENERATION_S": repr(PRIOR_GENERATION_S / s),
        "VIDQ_POLL_MIN_INTERVAL_S": repr(POLL_MIN_INTERVAL_S / s),
        "VIDQ_POLL_MAX_INTERVAL_S": repr(POLL_MAX_INTERVAL_S / s),
        "VIDQ_MAX_SUBMITS_PER_S": repr(cfg.max_submits_per_s * s),
        "VIDQ_STORAGE_URL": storage.resolve().as_uri(),
        "VIDQ_JOURNAL_DIR": f"{storage.resolve()}-journal",
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


@dataclass
class VidqRun:
    """Raw outcome of one vidq run against one sandbox and one private Redis."""

    jobs: list[dict]
    entries: list[dict]  # the sandbox ledger
    stats: dict  # the sandbox's /__stats
    counts: dict  # the batch's done/failed counters
    rss_peak_bytes: int
    redis_calls: int
    by_command: dict[str, int]
    durations: dict[str, list[str]]  # vidq's learned samples, per shape key


def execute(cfg: BenchConfig, work: Path, logs: Path, processes: int, concurrency: int, *,
            tag: str = "vidq", mean_generation_s: float = MEAN_GENERATION_S,
            during: Callable | None = None) -> VidqRun:
    """Start P workers on a fresh sandbox (mean `mean_generation_s` simulated
    seconds) and Redis, enqueue cfg.n prompts and wait until all are finished.
    `during(server, n)`, if given, returns a context manager held from just
    before the enqueue to the end of the batch (e.g. to change the sandbox)."""
    label = f"{tag}-{processes}x{concurrency}"
    storage = work / f"videos-{label}"
    prompts = infra.write_prompts(work / f"{label}.txt", cfg.n, label)
    stall_s = max(60.0, 20 * max(PRIOR_GENERATION_S, mean_generation_s) / cfg.time_scale)
    with infra.private_redis(work / f"redis-{label}") as redis_server, \
            infra.sandbox(cfg.time_scale, cfg.c, mean_generation_s=mean_generation_s) as server:
        env = vidq_env(cfg, redis_server.url, server, storage)
        workers = []
        try:
            for index in range(processes):
                workers.append(infra.start_celery(
                    "worker", ",".join(QUEUES), concurrency, f"{tag}{index}", env,
                    logs / f"{label}-worker{index}.log"))
            with infra.RssSampler([w.pid for w in workers]) as rss, \
                    (during(server, cfg.n) if during else contextlib.nullcontext()):
                probe = infra.RedisProbe(redis_server.url)
                meter = infra.CommandMeter(probe)
                meter.start()
                enqueued = run_enqueue(env, prompts, BATCH)
                counts = wait_batch(probe, enqueued["created"], stall_s)
                calls = meter.stop()
                by_command = probe.calls_by_command()
        finally:
            infra.stop_celery(workers)
        jobs = read_jobs(probe.client, sorted(probe.client.smembers(f"vidq:batch:{BATCH}:jobs")))
        durations = {key: probe.client.lrange(key, 0, -1)
                     for key in probe.client.scan_iter("vidq:durations:*")}
        entries, stats = infra.ledger(server), infra.stats(server)
    shutil.rmtree(storage, ignore_errors=True)
    return VidqRun(jobs, entries, stats, counts, rss.peak_bytes, calls, by_command, durations)


def stored_times(jobs: list[dict]) -> list[float]:
    return [float(j["downloaded_at"]) for j in jobs if j.get("state") == "done"]


def run_vidq(cfg: BenchConfig, work: Path, logs: Path, processes: int, concurrency: int) -> Row:
    label = f"{processes}x{concurrency}"
    run = execute(cfg, work, logs, processes, concurrency)
    row = build_row(f"vidq ({label})", cfg.n, cfg.c, run.entries, run.stats,
                    stored_times(run.jobs), run.rss_peak_bytes, run.redis_calls,
                    note=f"{processes} worker process(es) x -c {concurrency}")
    row.failed = run.counts.get("failed", 0)
    row.extra.update(detection_lag=detection_lag(run.jobs, run.entries, cfg.generation_s),
                     cycle=cycle_breakdown(run.jobs, run.entries, cfg.c),
                     counts=run.counts, commands_by_name=_top(run.by_command, 15),
                     vidq_polls=_poll_summary(run.jobs), sandbox_stats=run.stats)
    return row


def _top(counts: dict[str, int], limit: int) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:limit])


def _poll_summary(jobs: list[dict]) -> dict:
    polls = sorted(int(j.get("polls") or 0) for j in jobs)
    return {str(p): polls.count(p) for p in sorted(set(polls))}
