"""A naive Celery design, for comparison: one task per prompt that submits,
then sleeps and polls inside the task every 10 simulated seconds, then
downloads. A 429 on submit is retried by sleeping Retry-After in the task.

Configured from the environment: BENCH_REDIS_URL, BENCH_BASE_URL, BENCH_KEY,
BENCH_POLL_S, BENCH_OUT_DIR. Start with `celery -A bench.naive_app worker -c 8`.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import redis
import requests
from celery import Celery

from .config import MODEL

PATH = "/v2/video/generations"
DONE_KEY = "naive:stored"  # zset: prompt index -> time its video was stored

app = Celery("naive", broker=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:1/0"))
app.conf.update(task_ignore_result=True, worker_hijack_root_logger=False,
                broker_connection_retry_on_startup=True)


def _headers() -> dict:
    return {"Authorization": f"Bearer {os.environ['BENCH_KEY']}"}


def _submit(base_url: str, prompt: str) -> str:
    while True:
        response = requests.post(base_url + PATH, json={"model": MODEL, "prompt": prompt},
                                 headers=_headers(), timeout=30)
        if response.status_code != 429:
            response.raise_for_status()
            return response.json()["id"]
        time.sleep(float(response.headers.get("Retry-After") or 1))


def _wait(base_url: str, gen_id: str, poll_s: float) -> str:
    while True:
        body = requests.get(base_url + PATH, params={"generation_id": gen_id},
                            headers=_headers(), timeout=30).json()
        if body["status"] == "completed":
            return body["video"]["url"]
        if body["status"] in ("error", "failed"):
            raise RuntimeError(f"generation {gen_id} failed")
        time.sleep(poll_s)


@app.task(name="naive.generate")
def generate(index: int, prompt: str) -> None:
    base_url = os.environ["BENCH_BASE_URL"]
    url = _wait(base_url, _submit(base_url, prompt), float(os.environ["BENCH_POLL_S"]))
    target = Path(os.environ["BENCH_OUT_DIR"]) / f"{index}.mp4"
    with requests.get(url, stream=True, timeout=30) as response, open(target, "wb") as out:
        response.raise_for_status()
        for chunk in response.iter_content(1 << 20):
            out.write(chunk)
    redis.Redis.from_url(os.environ["BENCH_REDIS_URL"]).zadd(DONE_KEY, {str(index): time.time()})
