"""Real parts for a scenario: sandbox, private Redis, Celery processes, probes."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import redis
import requests

from producer.redis_server import PrivateRedis
from sandbox import SandboxConfig, SandboxServer

from .config import MEAN_GENERATION_S, SANDBOX_SEED

SANDBOX_KEY = "bench-key"


@contextlib.contextmanager
def sandbox(time_scale: float, max_concurrency: int, pad_video_to: int = 0,
            mean_generation_s: float = MEAN_GENERATION_S):
    config = SandboxConfig(port=0, api_key=SANDBOX_KEY, time_scale=time_scale,
                           max_concurrency=max_concurrency, mean_generation_s=mean_generation_s,
                           spread=0.1, seed=SANDBOX_SEED, pad_video_to=pad_video_to)
    with SandboxServer(config) as server:
        server.videos.get(1280, 720)  # render/pad before the clock starts
        yield server


@contextlib.contextmanager
def private_redis(state_dir: Path):
    """A fresh redis-server on a free port (never the machine's 6379)."""
    with PrivateRedis(state_dir) as server:
        redis.Redis.from_url(server.url).flushall()
        yield server


def set_mean_generation_s(server: SandboxServer, mean_s: float) -> None:
    """Change the mean of generations submitted from now on (simulated seconds).

    The sandbox runs in this process; SandboxState draws each duration from
    `state.config` under its lock, so swapping the (frozen) config object is
    atomic and changes nothing else: the HTTP server keeps its own reference.
    """
    server.state.config = dataclasses.replace(server.state.config, mean_generation_s=mean_s)


def ledger(server: SandboxServer) -> list[dict]:
    return requests.get(server.url + "/__ledger", timeout=60).json()


def stats(server: SandboxServer) -> dict:
    return requests.get(server.url + "/__stats", timeout=10).json()


class RedisProbe:
    """Reads Redis counters, and counts the commands it sends itself so that
    they can be left out of the system's command count."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.own_calls = 0

    def call(self, name: str, *args):
        self.own_calls += 1
        return getattr(self.client, name)(*args)

    def total_calls(self) -> int:
        info = self.call("info", "commandstats")
        return sum(entry["calls"] for entry in info.values())

    def calls_by_command(self) -> dict[str, int]:
        info = self.call("info", "commandstats")
        return {name.removeprefix("cmdstat_"): entry["calls"] for name, entry in info.items()}

    def used_memory(self) -> int:
        return int(self.call("info", "memory")["used_memory"])


class CommandMeter:
    """Redis calls made by others between start() and stop()."""

    def __init__(self, probe: RedisProbe):
        self.probe = probe

    def start(self) -> None:
        self._calls = self.probe.total_calls()
        self._own = self.probe.own_calls

    def stop(self) -> int:
        total = self.probe.total_calls() - self._calls
        own = self.probe.own_calls - self._own  # includes this INFO call
        return total - own


class Watcher:
    """Calls `tick()` every `interval_s` in a thread while the `with` block
    runs, until the block ends or `tick()` returns True."""

    interval_s = 0.5

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self.tick() and not self._stop.wait(self.interval_s):
            pass

    def tick(self) -> bool:
        raise NotImplementedError


class RssSampler(Watcher):
    """Peak of the summed RSS of a process and all its descendants."""

    def __init__(self, pids: list[int], interval_s: float = 0.5):
        self.pids = pids
        self.interval_s = interval_s
        self.peak_bytes = 0

    def tick(self) -> bool:
        self.peak_bytes = max(self.peak_bytes, tree_rss(self.pids))
        return False


def tree_rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
    return total


def start_celery(app: str, queues: str | None, concurrency: int, name: str,
                 env: dict, log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "celery", "-A", app, "worker", "-P", "prefork",
               "-c", str(concurrency), "-n", f"{name}-{os.getpid()}@%h", "--loglevel", "INFO"]
    if queues:
        command += ["-Q", queues]
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=Path(__file__).parent.parent)
    wait_for_log(log_path, "ready.", process)
    return process


def wait_for_log(path: Path, needle: str, process: subprocess.Popen, timeout_s=60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if needle in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise RuntimeError(f"worker exited early; see {path}")
        time.sleep(0.1)
    raise RuntimeError(f"worker not ready in {timeout_s:.0f} s; see {path}")


def stop_celery(processes: list[subprocess.Popen], grace_s: float = 3.0) -> None:
    """Stop workers we started (measurements are done, nothing to hand back):
    SIGTERM, then SIGKILL for them and their pool children after grace_s."""
    children = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            children += psutil.Process(process.pid).children(recursive=True)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()


def write_prompts(path: Path, count: int, tag: str) -> Path:
    lines = (f"{tag} prompt {i}: a lighthouse keeper watches storm wave {i} break"
             for i in range(count))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
