"""Scenarios 4 and 5: enqueue throughput, and one large download."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

from . import infra
from .config import MODEL, BenchConfig
from .scenario_vidq import run_enqueue

PROJECT = Path(__file__).resolve().parent.parent
DOWNLOAD_ROUNDS = 5
# The first two are the measurement; the last two only explain a difference.
DOWNLOAD_MODES = ("plain", "vidq", "vidq-nofsync", "plain-fsync")


def run_enqueue_throughput(cfg: BenchConfig, work: Path) -> dict:
    """`enqueue_file` of a big .txt into an empty private Redis, no workers."""
    prompts = infra.write_prompts(work / "enqueue.txt", cfg.enqueue_n, "enqueue")
    with infra.private_redis(work / "redis-enqueue") as server:
        probe = infra.RedisProbe(server.url)
        before = probe.used_memory()
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIDQ_")}
        env.update(VIDQ_REDIS_URL=server.url, VIDQ_MAX_IN_FLIGHT=str(cfg.c))
        result = run_enqueue(env, prompts, "enqueue")
        after = probe.used_memory()
    prompts.unlink()
    return {"prompts": cfg.enqueue_n, "created": result["created"],
            "seconds": result["seconds"], "prompts_per_s": cfg.enqueue_n / result["seconds"],
            "redis_bytes_per_job": (after - before) / cfg.enqueue_n,
            "redis_used_memory_delta": after - before}


def finished_video_url(server) -> str:
    headers = {"Authorization": f"Bearer {infra.SANDBOX_KEY}"}
    url = server.url + "/v2/video/generations"
    body = {"model": MODEL, "prompt": "one very large video"}
    gen_id = requests.post(url, json=body, headers=headers, timeout=30).json()["id"]
    while True:
        status = requests.get(url, params={"generation_id": gen_id}, headers=headers,
                              timeout=30).json()
        if status["status"] == "completed":
            return status["video"]["url"]
        time.sleep(0.05)


def probe_download(mode: str, url: str, target: Path, env: dict) -> dict:
    command = [sys.executable, "-m", "bench.download_probe", mode, url, str(target)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=PROJECT)
    if done.returncode:
        raise RuntimeError(f"{mode} download failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["mb_per_s"] = result["bytes"] / result["seconds"] / 1e6
    result["rss_growth_mb"] = (result["rss_peak"] - result["rss_before"]) / 1e6
    return result


def download_once(mode: str, url: str, work: Path, env: dict) -> dict:
    """One download in a fresh process; the file is removed and the page cache
    written back afterwards, so runs do not pay for each other's writeback."""
    plain = mode.startswith("plain")
    target = work / "plain.mp4" if plain else work / f"{mode}-store"
    result = probe_download(mode, url, target, env)
    written = target if plain else target / "dl" / "big.mp4"
    written.unlink()
    os.sync()
    return result


def run_download(cfg: BenchConfig, work: Path) -> dict:
    with infra.private_redis(work / "redis-download") as redis_server, \
            infra.sandbox(cfg.time_scale, cfg.c, pad_video_to=cfg.download_bytes) as server:
        url = finished_video_url(server)
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIDQ_")}
        env.update(VIDQ_REDIS_URL=redis_server.url, AIMLAPI_BASE_URL=server.url,
                   AIMLAPI_KEY=infra.SANDBOX_KEY)
        runs = {mode: [] for mode in DOWNLOAD_MODES}
        for _ in range(DOWNLOAD_ROUNDS):  # interleaved, so drift hits every mode
            for mode in DOWNLOAD_MODES:
                runs[mode].append(download_once(mode, url, work, env))
        served = infra.ledger(server)[0]["size"]
    return summarize_download(runs, served)


def summarize_download(runs: dict, served_bytes: int) -> dict:
    """Median throughput of each mode over the rounds; worst RSS growth."""
    plain, vidq, nofsync, plain_fsync = (statistics.median(r["mb_per_s"] for r in runs[mode])
                                         for mode in DOWNLOAD_MODES)
    return {"bytes": served_bytes, "plain_mb_per_s": plain, "vidq_mb_per_s": vidq,
            "ratio": vidq / plain, "vidq_nofsync_mb_per_s": nofsync,
            "nofsync_ratio": nofsync / plain, "plain_fsync_mb_per_s": plain_fsync,
            "ratio_vs_plain_fsync": vidq / plain_fsync,
            "vidq_rss_growth_mb": max(r["rss_growth_mb"] for r in runs["vidq"]),
            "plain_rss_growth_mb": max(r["rss_growth_mb"] for r in runs["plain"]),
            "sizes_match": all(r["bytes"] == served_bytes for rs in runs.values() for r in rs),
            "runs": runs}
