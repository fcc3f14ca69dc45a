"""Real parts for the tests: a private Redis server, the sandbox upstream over
HTTP, and Celery worker processes (started as `celery -A worker worker` starts
them: tests/worker_main.py).

No eager mode, no fake Redis: every test talks to the real thing.
"""
from __future__ import annotations

import compileall
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
import requests
from chaos.faultproxy import FaultProxy

import worker
from producer.enqueue import enqueue_file, open_admission
from producer.local import stop_processes
from producer.redis_server import PrivateRedis
from sandbox import SandboxConfig, SandboxServer
from worker.celery_app import QUEUES, apply_settings
from worker.jobs import JobStore
from worker.settings import Settings
from worker.tasks import dispatch


def pytest_configure(config: pytest.Config) -> None:
    """Byte-compile the project once, before any worker or `vidq` process
    starts: with PYTHONDONTWRITEBYTECODE set (as on CI machines), each of the
    suite's thousand-odd processes compiled every vidq module again, about
    0.3 s of CPU each on a CPU-bound run. Python reads a .pyc it finds even
    then; compileall skips a module whose .pyc is current."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller did it
        return
    root = Path(__file__).resolve().parent.parent
    for package in ("worker", "producer", "sandbox", "bench", "tests/chaos"):
        compileall.compile_dir(root / package, quiet=2)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first (a stable sort: the rest keep their order), so that
    none of them starts last and runs alone at the end of the suite."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


WORKER_MAIN = Path(__file__).resolve().parent / "worker_main.py"

# Fast clocks: a 90 s generation takes about 1 s in the sandbox.
TIME_SCALE = 90.0
FAST_WORKER_ENV = {
    "VIDQ_EXPECTED_GENERATION_S": "1.0",
    "VIDQ_POLL_MIN_INTERVAL_S": "0.1",
    "VIDQ_POLL_MAX_INTERVAL_S": "5",
    # Paced like production (worker/pacing.py), only faster: C POSTs at once
    # wait a few tens of ms for their turns.
    "VIDQ_MAX_SUBMITS_PER_S": "20",
    "VIDQ_BACKOFF_BASE_S": "0.2",
    "VIDQ_BACKOFF_CAP_S": "2",
    "VIDQ_RECONCILE_INTERVAL_S": "1",
    "VIDQ_HTTP_TIMEOUT_S": "2",
    "VIDQ_STEP_GRACE_S": "10",
    "VIDQ_POST_DEADLINE_S": "4",
    "VIDQ_HEARTBEAT_INTERVAL_S": "0.5",
    "VIDQ_DOWNLOAD_GRACE_S": "60",
    "VIDQ_VISIBILITY_TIMEOUT_S": "300",
}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    given = os.environ.get("VIDQ_TEST_REDIS_URL")
    if given:
        yield given
        return
    with PrivateRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def restartable_redis(tmp_path):
    """A private redis-server (AOF, fsync always) that a test may stop and start again
    on the same port, keeping its data."""
    server = PrivateRedis(tmp_path / "redis-restartable").start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """A clean Redis for each test."""
    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    yield redis_server
    client.flushdb()


@pytest.fixture(scope="session")
def video_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sandbox-cache")


@pytest.fixture
def make_sandbox(video_cache):
    servers = []

    def start(**overrides) -> SandboxServer:
        options = {"time_scale": TIME_SCALE, "cache_dir": video_cache, "max_concurrency": 4,
                   "api_key": "sk-test-9f8e7d6c5b4a", "seed": 7}
        options.update(overrides)
        server = SandboxServer(SandboxConfig(**options)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


class Pipeline:
    """One test's system: env for workers, the producer side, and helpers."""

    def __init__(self, env: dict, sandbox: SandboxServer, log_dir: Path):
        self.env = env
        self.sandbox = sandbox
        self.log_dir = log_dir
        self.settings = Settings.from_env(env)
        self.processes: list[subprocess.Popen] = []
        apply_settings(worker.app, self.settings)
        self.admission = open_admission(self.settings)
        self.store: JobStore = self.admission.store

    def start_workers(self, count: int = 1, concurrency: int = 4, queues=QUEUES) -> None:
        for index in range(len(self.processes), len(self.processes) + count):
            log_path = self.log_dir / f"worker-{index}.log"
            # `celery -A worker worker` without its command line (tests/worker_main.py).
            command = [sys.executable, str(WORKER_MAIN), "-Q", ",".join(queues),
                       "-c", str(concurrency), "-n", f"test{index}@%h"]
            self.processes.append(subprocess.Popen(
                command, env=self.env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
                start_new_session=True))
            wait_for_log(log_path, "ready.", self.processes[-1])

    def stop_workers(self) -> None:
        stop_processes(self.processes)
        for process in self.processes:
            # A pool child whose worker was SIGKILLed (or killed by a test)
            # may live on in the worker's session: never leak it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        self.processes = []

    def enqueue(self, path: Path, batch: str, **defaults):
        defaults.setdefault("model", "alibaba/wan2.1-t2v-turbo")
        return enqueue_file(self.admission, path, batch, defaults, dispatch)

    def wait_finished(self, batch: str, timeout_s: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            counts = self.store.counts(batch)
            if counts["done"] + counts["failed"] >= self.store.batch_total(batch):
                return counts
            time.sleep(0.2)
        raise AssertionError(f"batch {batch} not finished in {timeout_s} s: "
                             f"{self.store.counts(batch)}; logs in {self.log_dir}")

    def wait_polls_held(self, batch: str, count: int, timeout_s: float = 30.0) -> None:
        """Until `count` jobs of `batch` wait on a countdown poll that a worker
        holds (the moment to kill that worker)."""
        def held() -> bool:
            jobs = [self.store.get(f"{batch}:{i}") for i in self.store.job_ids(batch)]
            return sum(1 for j in jobs if j and j.step == "poll" and j.extra.get("holder")) == count
        wait_until(held, timeout_s, f"{count} polls of batch {batch} held by a worker", 0.1)

    def ledger(self) -> list[dict]:
        return requests.get(self.sandbox.url + "/__ledger", timeout=10).json()

    def faults(self, **faults) -> None:
        requests.post(self.sandbox.url + "/__faults", json=faults, timeout=10).raise_for_status()


def wait_for_log(path: Path, needle: str, process: subprocess.Popen, timeout_s=60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise AssertionError(f"worker exited early:\n{path.read_text(errors='replace')}")
        time.sleep(0.1)
    raise AssertionError(f"worker not ready in {timeout_s} s:\n{path.read_text(errors='replace')}")


@pytest.fixture
def make_pipeline(redis_url, make_sandbox, tmp_path):
    made = []

    def build(sandbox: SandboxServer | None = None, **env_overrides) -> Pipeline:
        sandbox = sandbox or make_sandbox()
        env = dict(os.environ)
        for name in ("AIML_API_KEY", "VIDQ_STORAGE_URL", "VIDQ_ENDPOINT"):
            env.pop(name, None)
        env.update(FAST_WORKER_ENV)
        env.update({
            "VIDQ_REDIS_URL": redis_url, "AIMLAPI_BASE_URL": sandbox.url,
            "AIMLAPI_KEY": sandbox.config.api_key, "VIDQ_MAX_IN_FLIGHT": "4",
            "VIDQ_STORAGE_URL": (tmp_path / "videos").as_uri(),
            "VIDQ_JOURNAL_DIR": str(tmp_path / "journal"),
        })
        env.update({k: str(v) for k, v in env_overrides.items()})
        (tmp_path / "logs").mkdir(exist_ok=True)
        pipeline = Pipeline(env, sandbox, tmp_path / "logs")
        made.append(pipeline)
        return pipeline

    yield build
    for pipeline in made:
        pipeline.stop_workers()


def wait_http(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 30.0) -> None:
    """Wait until a server started as `process` (e.g. Flower) answers `url` with 2xx.
    A request that times out is asked again: a loaded machine's server may take over a
    second to answer its first one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{url}: the server exited:\n{log.read_text(errors='replace')}")
        try:
            if requests.get(url, timeout=1).ok:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer in {timeout_s} s; log {log}")


@pytest.fixture
def proxied(make_pipeline, make_sandbox):
    """Pipelines whose upstream is reached through a fault proxy (tests/chaos)."""
    proxies = []

    def build(sandbox=None, **env):
        sandbox = sandbox or make_sandbox()
        proxy = FaultProxy(sandbox.url, seed=3, rewrite_urls=True).start()
        proxies.append(proxy)
        return make_pipeline(sandbox, AIMLAPI_BASE_URL=proxy.url, **env), proxy

    yield build
    for proxy in proxies:
        proxy.stop()


def unknown_post_trickling(proxied, tmp_path: Path, batch: str, prompt: str, *,
                           deadline_s: float, interval_s: float = 0.25):
    """A one-job batch whose POST's answer trickles in (one byte every
    `interval_s`; ~290 bytes): the job fails "outcome unknown" at `deadline_s`
    while its worker is still reading the answer. Returns the pipeline and the
    proxy (`proxy.trickle_interval_s = 0.001` lets the rest of the answer in)."""
    pipeline, proxy = proxied(VIDQ_POST_DEADLINE_S=str(deadline_s))
    proxy.trickle_interval_s = interval_s
    proxy.queue("trickle", count=1, method="POST")
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / f"{batch}.txt", [prompt]), batch)
    assert pipeline.wait_finished(batch, timeout_s=30)["failed"] == 1
    return pipeline, proxy


def wait_until(predicate, timeout_s: float = 60.0, what: str = "condition",
               every_s: float = 0.2):
    """Poll `predicate` until it returns something truthy (returned), or fail
    naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"{what} not reached in {timeout_s} s")


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return path


def learned_then(make_pipeline, make_sandbox, tmp_path: Path,
                 learn: tuple[float, list[str], float], then: tuple[float, list[str], float],
                 **env) -> Pipeline:
    """Batch "a" on a sandbox of one time scale, then, with fresh workers on the
    same Redis (what "a" taught the plan), batch "b" on another: each
    (time_scale, prompts, timeout_s) must end all done. The second pipeline,
    its workers still running."""
    pipeline = None
    for batch, (time_scale, prompts, timeout_s) in (("a", learn), ("b", then)):
        if pipeline is not None:
            pipeline.stop_workers()
        pipeline = make_pipeline(make_sandbox(time_scale=time_scale), **env)
        pipeline.start_workers()
        pipeline.enqueue(write_prompts(tmp_path / f"{batch}.txt", prompts), batch)
        assert pipeline.wait_finished(batch, timeout_s=timeout_s)["done"] == len(prompts)
    assert pipeline is not None
    return pipeline


@pytest.fixture
def serve_bytes():
    """A local HTTP server answering every GET and POST with fixed bytes (and
    a status, 200 unless given); `.posts` counts the POSTs it answered."""
    servers = []

    def start(body: bytes, status: int = 200, cut_at: int | None = None,
              headers: dict[str, str] | None = None) -> str:
        """`cut_at`: send the body's full Content-Length but only its first
        `cut_at` bytes, then close (a connection lost mid-answer)."""
        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                if self.command == "POST":
                    start.posts += 1
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:cut_at])
                self.close_connection = True

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    start.posts = 0  # type: ignore[attr-defined]
    yield start
    for server in servers:
        server.shutdown()
