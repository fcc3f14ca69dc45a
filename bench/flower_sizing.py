"""Flower sized for a night: `python -m bench.flower_sizing [--n 20000] [--c 100]`.

Runs one vidq batch of N jobs against the sandbox (generations of about
90/S s) with Flower started with the flags docker-compose.yml documents, and
measures, every couple of seconds while the batch runs, Flower's RSS and how
long its task list takes to answer: the /tasks page and the /tasks/datatable
JSON the page loads (first page, newest first; and the Failed filter).
Prints the figures and writes bench/results/flower-<UTC>.json.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests
import yaml

from producer.redis_server import free_port
from worker.celery_app import QUEUES

from . import infra
from .config import BenchConfig
from .report import write_json
from .scenario_vidq import BATCH, run_enqueue, vidq_env, wait_batch

ROOT = Path(__file__).resolve().parent.parent
AUTH = ("bench", "bench-pass")
REJECT_EVERY = 500
SLOW_S = 1.0  # the bar: task list pages under a second
DATATABLE = {  # what the page's DataTables sends for "15 newest tasks"
    "draw": "1", "start": "0", "length": "15", "order[0][column]": "0",
    "order[0][dir]": "desc", "columns[0][data]": "received", "search[value]": ""}


def documented_flower_args(port: int, db: Path) -> list[str]:
    """Flower's command from docker-compose.yml, bound here: same sizing flags."""
    command = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["flower"][
        "command"]
    local = {"--address": "127.0.0.1", "--port": str(port), "--db": str(db)}

    def bind(arg: str) -> str:
        name = arg.split("=", 1)[0]
        return f"{name}={local[name]}" if name in local else arg

    return [sys.executable, "-m", *map(bind, command), f"--basic-auth={AUTH[0]}:{AUTH[1]}"]


def start_flower(env: dict, work: Path, log: Path) -> tuple[subprocess.Popen, str, list[str]]:
    port = free_port()
    command = documented_flower_args(port, work / "flower.db")
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=open(log, "wb"),
                               stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Flower exited; see {log}")
        try:
            if requests.get(base + "/healthcheck", timeout=1).ok:
                return process, base, command
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"Flower did not answer; see {log}")


class FlowerProbe(infra.Watcher):
    """Samples Flower's RSS and its task list's latency while the batch runs."""

    def __init__(self, base: str, pid: int, interval_s: float = 2.0):
        self.base, self.pid, self.interval_s = base, pid, interval_s
        self.samples: list[dict] = []
        self.started = time.monotonic()

    def _timed(self, method: str, path: str, **kwargs) -> tuple[float, requests.Response]:
        began = time.monotonic()
        response = requests.request(method, self.base + path, auth=AUTH, timeout=60, **kwargs)
        response.raise_for_status()
        return time.monotonic() - began, response

    def tick(self) -> bool:
        try:
            self.samples.append(self._sample())
        except (requests.RequestException, psutil.Error) as exc:
            self.samples.append({"t_s": round(time.monotonic() - self.started, 2),
                                 "error": str(exc)[:300]})
        return False

    def _sample(self) -> dict:
        page_s, _ = self._timed("GET", "/tasks")
        table_s, table = self._timed("POST", "/tasks/datatable", data=DATATABLE)
        failed_s, _ = self._timed("POST", "/tasks/datatable",
                                  data={**DATATABLE, "search[value]": "state:FAILURE"})
        return {
            "t_s": round(time.monotonic() - self.started, 2),
            "rss_mb": round(psutil.Process(self.pid).memory_info().rss / 1e6, 1),
            "tasks_in_flower": table.json()["recordsTotal"],
            "tasks_page_s": round(page_s, 4), "datatable_s": round(table_s, 4),
            "failed_filter_s": round(failed_s, 4)}


def summary(values: list[float]) -> dict:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"median": round(statistics.median(ordered), 4), "p95": round(at(0.95), 4),
            "p99": round(at(0.99), 4), "max": round(ordered[-1], 4),
            "over_1s": sum(v > SLOW_S for v in ordered), "samples": len(ordered)}


def write_prompts(path: Path, count: int) -> Path:
    """One prompt in REJECT_EVERY is refused by the sandbox, so the Failed
    filter has rows to find, as on a real night."""
    lines = (f"flower prompt {i}: " + ("REJECT " if i % REJECT_EVERY == 7 else "")
             + f"a lighthouse keeper watches storm wave {i} break" for i in range(count))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run(cfg: BenchConfig, work: Path, processes: int, concurrency: int) -> dict:
    prompts = write_prompts(work / "prompts.txt", cfg.n)
    with infra.private_redis(work / "redis") as redis_server, \
            infra.sandbox(cfg.time_scale, cfg.c) as server:
        env = vidq_env(cfg, redis_server.url, server, work / "videos")
        flower, base, command = start_flower(env, work, work / "flower.log")
        workers: list[subprocess.Popen] = []
        try:
            workers = [infra.start_celery("worker", ",".join(QUEUES), concurrency, f"fl{i}",
                                          env, work / f"worker{i}.log")
                       for i in range(processes)]
            began = time.monotonic()
            with FlowerProbe(base, flower.pid) as probe:
                created = run_enqueue(env, prompts, BATCH)["created"]
                counts = wait_batch(infra.RedisProbe(redis_server.url), created, stall_s=120)
                makespan = time.monotonic() - began
                time.sleep(5)  # the last events reach Flower
        finally:
            infra.stop_celery(workers)
            flower.terminate()
            flower.wait(60)
    return report(cfg, command, probe.samples, counts, makespan, work / "flower.log")


def report(cfg: BenchConfig, command: list[str], samples: list[dict], counts: dict,
           makespan: float, log: Path) -> dict:
    warnings = [line for line in log.read_text(errors="replace").splitlines()
                if "Saving state took" in line]
    good = [s for s in samples if "error" not in s]
    return {
        "n": cfg.n, "c": cfg.c, "generation_s": cfg.generation_s, "counts": counts,
        "makespan_s": round(makespan, 1),
        "flower_command": [a for a in command if not a.startswith("--basic-auth")][2:],
        "rss_mb": {"peak": max(s["rss_mb"] for s in good), "end": good[-1]["rss_mb"]},
        "tasks_in_flower_end": good[-1]["tasks_in_flower"],
        "tasks_page_s": summary([s["tasks_page_s"] for s in good]),
        "datatable_s": summary([s["datatable_s"] for s in good]),
        "failed_filter_s": summary([s["failed_filter_s"] for s in good]),
        "sample_errors": [s for s in samples if "error" in s],
        "state_save_warnings": warnings, "samples": samples,
    }


def print_report(result: dict) -> None:
    print(f"{result['n']:,} jobs in {result['makespan_s']} s (C = {result['c']}, "
          f"T = {result['generation_s']:.2f} s): {result['counts']}")
    print("flower " + " ".join(result["flower_command"]))
    print(f"Flower RSS: peak {result['rss_mb']['peak']} MB, end {result['rss_mb']['end']} MB, "
          f"{result['tasks_in_flower_end']:,} tasks held at the end")
    for name in ("tasks_page_s", "datatable_s", "failed_filter_s"):
        figures = result[name]
        print(f"{name:16} median {figures['median']:.3f} s  p95 {figures['p95']:.3f} s  "
              f"p99 {figures['p99']:.3f} s  max {figures['max']:.3f} s  "
              f"over 1 s: {figures['over_1s']}/{figures['samples']}")
    for error in result["sample_errors"]:
        print("sample failed:", error)
    for line in result["state_save_warnings"]:
        print("flower log:", line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flower_sizing", description=__doc__)
    parser.add_argument("--n", type=int, default=20_000, help="jobs in the batch")
    parser.add_argument("--c", type=int, default=100, help="upstream concurrency cap C")
    parser.add_argument("--time-scale", type=float, default=180.0,
                        help="sandbox speed-up S; a generation takes about 90/S s")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (-c 4 each)")
    args = parser.parse_args(argv)
    cfg = BenchConfig(n=args.n, c=args.c, time_scale=args.time_scale)
    work = Path(tempfile.mkdtemp(prefix="vidq-flower-bench-"))
    try:
        result = run(cfg, work, args.workers, 4)
    finally:
        shutil.rmtree(work / "videos", ignore_errors=True)
    print_report(result)
    out = write_json(result, "flower-", latest=False)
    print(f"written {out.relative_to(ROOT)}; logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
