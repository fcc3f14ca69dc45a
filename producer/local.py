"""`vidq run`: the whole system on one machine for one batch.

Starts what is missing (a private Redis, the sandbox upstream), N Celery
worker processes, enqueues the file, shows progress, and stops everything it
started, whatever happens.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from worker.celery_app import QUEUES
from worker.errors import ConfigError
from worker.settings import Settings

from .redis_server import PrivateRedis

# Ten example prompts at the default cap of 2 finish in about a minute.
SANDBOX_TIME_SCALE = 9.0


@dataclass(frozen=True)
class RunOptions:
    file: Path
    batch: str
    use_sandbox: bool
    workers: int
    concurrency: int
    state_dir: Path


@contextlib.contextmanager
def local_system(options: RunOptions, console: Console):
    """Yields the environment every part of this run shares, and a liveness check."""
    env = dict(os.environ)
    with contextlib.ExitStack() as stack:
        if not env.get("VIDQ_REDIS_URL"):
            server = stack.enter_context(PrivateRedis(options.state_dir / "redis"))
            env["VIDQ_REDIS_URL"] = server.url
            console.print(f"private Redis at {server.url}")
        if options.use_sandbox:
            env.update(stack.enter_context(sandbox_upstream(env, console)))
        elif not (env.get("AIMLAPI_KEY") or env.get("AIML_API_KEY")):
            raise ConfigError("no API key: set AIMLAPI_KEY to run against the real API, "
                              "or add --sandbox to try the pipeline without spending credits")
        processes = stack.enter_context(worker_processes(options, env, console))
        yield env, lambda: any(p.poll() is None for p in processes)


@contextlib.contextmanager
def sandbox_upstream(env: dict, console: Console):
    from sandbox import SandboxConfig, SandboxServer

    settings = Settings.from_env(env)
    config = SandboxConfig(port=0, api_key=secrets.token_urlsafe(16),
                           time_scale=SANDBOX_TIME_SCALE,
                           max_concurrency=settings.max_in_flight)
    with SandboxServer(config) as server:
        console.print(f"sandbox upstream at {server.url} (time scale {SANDBOX_TIME_SCALE:g})")
        yield {
            "AIMLAPI_BASE_URL": server.url, "AIMLAPI_KEY": config.api_key,
            "VIDQ_EXPECTED_GENERATION_S": str(config.mean_generation_s / config.time_scale),
            "VIDQ_POLL_MIN_INTERVAL_S": "0.5",
        }


@contextlib.contextmanager
def worker_processes(options: RunOptions, env: dict, console: Console):
    log_dir = options.state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = []
    try:
        for index in range(options.workers):
            log = open(log_dir / f"worker-{index}.log", "ab")
            command = [sys.executable, "-m", "celery", "-A", "worker", "worker",
                       "-Q", ",".join(QUEUES), "-c", str(options.concurrency),
                       "-n", f"vidq-run-{index}-{os.getpid()}@%h", "--loglevel", "INFO"]
            processes.append(subprocess.Popen(command, env=env, stdout=log,
                                              stderr=subprocess.STDOUT))
        console.print(f"{options.workers} worker process(es), logs in {log_dir}")
        yield processes
    finally:
        stop_processes(processes)


def stop_processes(processes: list[subprocess.Popen], timeout_s: float = 20.0) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
