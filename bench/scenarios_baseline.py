"""Scenarios 1 and 2: the seed's sequential loop and a naive Celery design."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from celery import Celery

from . import infra
from .config import NAIVE_CONCURRENCY, BenchConfig
from .metrics import Row, build_row
from .naive_app import DONE_KEY


def run_seed(cfg: BenchConfig, work: Path) -> Row:
    """The seed loop on a subset of prompts, makespan extrapolated to N."""
    count, out_dir = min(cfg.seed_subset, cfg.n), work / "seed-videos"
    with infra.sandbox(cfg.time_scale, cfg.c) as server:
        command = [sys.executable, "-m", "bench.seed_loop", server.url, infra.SANDBOX_KEY,
                   str(count), repr(cfg.seed_poll_s), str(out_dir), "seed"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=_project_dir())
        with infra.RssSampler([process.pid]) as rss:
            output, _ = process.communicate()
        if process.returncode:
            raise RuntimeError(f"seed loop exited with {process.returncode}")
        result = json.loads(output)
        entries, stats = infra.ledger(server), infra.stats(server)
    shutil.rmtree(out_dir, ignore_errors=True)
    note = f"extrapolated from {count} prompts" if count < cfg.n else ""
    row = build_row("seed", cfg.n, cfg.c, entries, stats, result["stored_at"],
                    rss.peak_bytes, 0, note=note)
    row.extra["redis"] = "not used"
    return row


def naive_env(redis_url: str, server, cfg: BenchConfig, out_dir: Path) -> dict:
    env = dict(os.environ)
    env.update({"BENCH_REDIS_URL": redis_url, "BENCH_BASE_URL": server.url,
                "BENCH_KEY": infra.SANDBOX_KEY, "BENCH_POLL_S": repr(cfg.seed_poll_s),
                "BENCH_OUT_DIR": str(out_dir)})
    return env


def publish_naive(redis_url: str, count: int) -> None:
    producer = Celery("naive-producer", broker=redis_url)
    with producer.connection_for_write() as connection:
        for index in range(count):
            prompt = f"naive prompt {index}: a lighthouse keeper watches the storm"
            producer.send_task("naive.generate", (index, prompt), connection=connection)


def wait_naive(probe: infra.RedisProbe, count: int, stall_s: float) -> None:
    last, last_change = -1, time.monotonic()
    while (done := probe.call("zcard", DONE_KEY)) < count:
        if done != last:
            last, last_change = done, time.monotonic()
        if time.monotonic() - last_change > stall_s:
            raise RuntimeError(f"naive run stalled at {done}/{count}")
        time.sleep(0.5)


def run_naive(cfg: BenchConfig, work: Path, logs: Path) -> Row:
    count, out_dir = cfg.naive_subset(), work / "naive-videos"
    out_dir.mkdir(parents=True, exist_ok=True)
    with infra.private_redis(work / "redis-naive") as redis_server, \
            infra.sandbox(cfg.time_scale, cfg.c) as server:
        env = naive_env(redis_server.url, server, cfg, out_dir)
        worker = infra.start_celery("bench.naive_app", None, NAIVE_CONCURRENCY, "naive",
                                    env, logs / "naive-worker.log")
        try:
            with infra.RssSampler([worker.pid]) as rss:
                probe = infra.RedisProbe(redis_server.url)
                meter = infra.CommandMeter(probe)
                meter.start()
                publish_naive(redis_server.url, count)
                wait_naive(probe, count, stall_s=max(60.0, 20 * cfg.generation_s))
                calls = meter.stop()
        finally:
            infra.stop_celery([worker])
        stored = [score for _, score in probe.client.zrange(DONE_KEY, 0, -1, withscores=True)]
        entries, stats = infra.ledger(server), infra.stats(server)
    shutil.rmtree(out_dir, ignore_errors=True)
    note = f"extrapolated from {count} prompts" if count < cfg.n else ""
    return build_row(f"naive-celery (-c {NAIVE_CONCURRENCY})", cfg.n, cfg.c, entries, stats,
                     stored, rss.peak_bytes, calls, note=note)


def _project_dir() -> Path:
    return Path(__file__).resolve().parent.parent
