"""`vidq run`: the whole system on one machine for one batch.

Starts what is missing (a private Redis keeping its state in the state
directory, the sandbox upstream), N supervised Celery worker processes,
enqueues the file, shows progress, and stops everything it started,
whatever happens.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from worker.celery_app import QUEUES, WEBHOOK_QUEUE
from worker.errors import ConfigError
from worker.settings import Settings

from .redis_server import PrivateRedis

# Ten example prompts at the default cap of 2 finish in about a minute.
SANDBOX_TIME_SCALE = 9.0
# A worker that keeps dying this soon after starting is misconfigured, not unlucky.
QUICK_EXIT_S = 15.0
MAX_QUICK_EXITS = 3
WEBHOOK_CONCURRENCY = 2  # deliveries are I/O-bound and rare: a small pool of their own


@dataclass(frozen=True)
class RunOptions:
    file: Path
    batch: str
    use_sandbox: bool
    workers: int
    concurrency: int
    state_dir: Path
    named_by_file: bool = False  # no --batch: the name was made of the file's


@contextlib.contextmanager
def local_system(options: RunOptions, console: Console):
    """Yields the environment every part of this run shares, and the worker supervisor."""
    env = dict(os.environ)
    # A paid id its worker was stopped holding is recorded by the next run's workers.
    env.setdefault("VIDQ_JOURNAL_DIR", str(options.state_dir / "journal"))
    with contextlib.ExitStack() as stack:
        server = None
        if not env.get("VIDQ_REDIS_URL"):
            server = stack.enter_context(PrivateRedis(options.state_dir / "redis"))
            env["VIDQ_REDIS_URL"] = server.url
            if server.left_by_killed_run:
                console.print(f"stopped the Redis a killed run left (pid "
                              f"{server.left_by_killed_run}); resuming from its state")
            console.print(f"private Redis at {server.url}, state in {server.state_dir} "
                          f"(commands in other shells: VIDQ_REDIS_URL={server.url})")
        if options.use_sandbox:
            env.update(stack.enter_context(sandbox_upstream(env, console, options.state_dir)))
        supervisor = stack.enter_context(worker_processes(options, env, console, server))
        yield env, supervisor


@contextlib.contextmanager
def sandbox_upstream(env: dict, console: Console, state_dir: Path):
    from sandbox import SandboxConfig, SandboxServer

    settings = Settings.from_env(env)
    config = SandboxConfig(port=0, api_key=secrets.token_urlsafe(16),
                           time_scale=SANDBOX_TIME_SCALE,
                           max_concurrency=settings.max_in_flight,
                           # Whole POSTs per second only: vidq paces 2.5/s as 2 per
                           # 0.8 s, which a per-second count would refuse.
                           max_submits_per_s=_whole(settings.max_submits_per_s),
                           # An interrupted run's generations still answer on resume.
                           journal_path=state_dir / "sandbox-generations.jsonl")
    with SandboxServer(config) as server:
        console.print(f"sandbox upstream at {server.url} (time scale {SANDBOX_TIME_SCALE:g})")
        yield {
            "AIMLAPI_BASE_URL": server.url, "AIMLAPI_KEY": config.api_key,
            "VIDQ_EXPECTED_GENERATION_S": str(config.mean_generation_s / config.time_scale),
            "VIDQ_POLL_MIN_INTERVAL_S": "0.5",
        }


def _whole(per_second: float) -> int:
    return int(per_second) if per_second >= 1 and per_second == math.floor(per_second) else 0


def stops_with_this_process():
    """A `preexec_fn`: the child gets a SIGTERM when the process starting it
    dies, however it dies (Linux's parent-death signal). A `vidq run` killed
    outright (SIGKILL, the OOM killer) left its workers running in sessions of
    their own, working the batch with nobody watching; they now stop as on
    Ctrl-C (their Redis, not signalled, stays up while they record what they
    hold; the same command stops it and resumes). None where unsupported."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    except (AttributeError, OSError):
        return None
    parent = os.getpid()

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # died before the signal was asked for
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child




PR_SET_PDEATHSIG = 1


@dataclass
class Supervisor:
    """Keeps N worker processes running: one that exits is started again."""

    options: RunOptions
    env: dict
    console: Console
    processes: list[subprocess.Popen] = field(default_factory=list)
    started_at: list[float] = field(default_factory=list)
    quick_exits: int = 0
    restarts: int = 0
    redis: PrivateRedis | None = None  # this run's own Redis, if it started one

    def start(self, index: int) -> subprocess.Popen:
        log_dir = self.options.state_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log = open(log_dir / f"worker-{index}.log", "ab")  # noqa: SIM115 (the child keeps it)
        # The last process delivers webhooks only: a receiver that hangs
        # until its timeout then holds none of the step workers' processes.
        webhooks = index == self.options.workers
        queues = [WEBHOOK_QUEUE] if webhooks else [q for q in QUEUES if q != WEBHOOK_QUEUE]
        concurrency = WEBHOOK_CONCURRENCY if webhooks else self.options.concurrency
        command = [sys.executable, "-m", "celery", "-A", "worker", "worker",
                   "-Q", ",".join(queues), "-c", str(concurrency),
                   "-n", f"vidq-run-{index}-{os.getpid()}@%h", "--loglevel", "INFO"]
        return subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=stops_with_this_process())

    def start_all(self) -> None:
        for index in range(self.options.workers + 1):  # + the webhook worker
            self.processes.append(self.start(index))
            self.started_at.append(time.monotonic())

    def redis_stopped(self) -> str:
        """Why this run's own Redis stopped ("" while it runs, or if it has
        none): nothing restarts it, so waiting for it is pointless."""
        process = self.redis.process if self.redis else None
        if self.redis is None or process is None or process.poll() is None:
            return ""
        log = self.redis.state_dir / self.redis.log_name
        tail = log.read_text(errors="replace").strip().splitlines()[-2:] if log.exists() else []
        return f"exit status {process.returncode}; {log} ends: " + " / ".join(tail)

    def keep_alive(self) -> bool:
        """Restart exited workers; False once they keep dying at start-up, or
        once this run's Redis has stopped."""
        if self.redis_stopped():
            return False
        for index, process in enumerate(self.processes):
            if process.poll() is None:
                continue
            quick = time.monotonic() - self.started_at[index] < QUICK_EXIT_S
            self.quick_exits = self.quick_exits + 1 if quick else 0
            if self.quick_exits >= MAX_QUICK_EXITS:
                return False
            self.console.print(f"[yellow]worker {index} exited ({process.returncode}); "
                               "starting it again[/]")
            self.processes[index] = self.start(index)
            self.started_at[index] = time.monotonic()
            self.restarts += 1
        return True


@contextlib.contextmanager
def worker_processes(options: RunOptions, env: dict, console: Console,
                     redis: PrivateRedis | None = None):
    supervisor = Supervisor(options, env, console, redis=redis)
    try:
        supervisor.start_all()
        console.print(f"{options.workers} worker process(es) and one for webhooks, logs in "
                      f"{options.state_dir / 'logs'}")
        yield supervisor
    finally:
        wait_s = worker_stop_wait_s(env) if _workers_may_hold_posts(env) else 20.0

        def say_why() -> None:
            # A closed terminal (SIGHUP) fails every write with EIO: that must
            # not cut the wait short (it killed the workers at once, review 137).
            with contextlib.suppress(OSError):
                console.print(f"stopping the workers: each ends the steps it runs first, a "
                              f"POST whose answer (a paid video) is on its way included; up "
                              f"to {wait_s:.0f} s")
        stop_processes(supervisor.processes, wait_s, on_slow=say_why)


def _workers_may_hold_posts(env: dict) -> bool:
    """False only if no worker has beaten in the last hour: none has taken a
    step, so none reads a POST's answer (a run stopped as it starts, whose
    workers booting under load took the long wait, review 137's suite run).
    Unknown (Redis away): True."""
    import redis

    from worker import keys

    try:
        client = redis.Redis.from_url(env["VIDQ_REDIS_URL"], socket_timeout=2,
                                      socket_connect_timeout=2)
        seconds, _ = client.time()
        return bool(client.zcount(keys.WORKERS, seconds - 3600, "+inf"))
    except (redis.RedisError, KeyError):
        return True


def worker_stop_wait_s(env: dict) -> float:
    """How long a stopping worker may take: a POST's deadline, then the wait
    for its late answer (worker/posting.py), and a margin. It used to be
    20 s: a worker still reading a POST's answer was killed, its pool child
    with it, and the paid generation was never recorded (review 135)."""
    from worker.posting import SHUTDOWN_WAIT_S

    try:
        deadline_s = Settings.from_env(env).post_deadline_s
    except ConfigError:  # the run refused bad settings before starting anything
        deadline_s = Settings.post_deadline_s
    return deadline_s + SHUTDOWN_WAIT_S + 15.0


def stop_processes(processes: list[subprocess.Popen], timeout_s: float = 20.0,
                   on_slow=None, slow_after_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL what is still running after `timeout_s`;
    `on_slow()` is called if some still run after `slow_after_s`."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout_s
    try:
        if on_slow is not None and not _all_exited(processes, min(slow_after_s, timeout_s)):
            on_slow()
        _all_exited(processes, max(0.0, deadline - time.monotonic()))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()


def _all_exited(processes: list[subprocess.Popen], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
    return True
