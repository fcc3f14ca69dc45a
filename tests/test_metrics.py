"""`vidq metrics --port N` after a sandbox batch on real workers: every figure
scraped over HTTP agrees with the sandbox's ledger and with Redis."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from producer.metrics_cmd import registry_for
from producer.redis_server import free_port
from sandbox.state import CREDITS_PER_VIDEO
from tests.conftest import wait_http, write_prompts
from worker import keys
from worker.errors import BadResponse, UpstreamUnavailable
from worker.metrics_record import RECORDER
from worker.settings import Settings
from worker.upstream import UpstreamClient


def start_exporter(env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(["vidq", "metrics", "--port", str(port)], env=env,
                               stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}/metrics"
    wait_http(url, process, log)
    return process, url


@pytest.fixture
def exporter():
    started: list[subprocess.Popen] = []

    def start(env: dict, log: Path) -> str:
        process, url = start_exporter(env, log)
        started.append(process)
        return url

    yield start
    for process in started:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def scrape(url: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of one scrape."""
    text = requests.get(url, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def total(samples: dict, name: str, **labels) -> float:
    """Sum of `name` over every series whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))


def test_scraped_metrics_match_the_sandbox_ledger_and_redis(make_pipeline, make_sandbox,
                                                            exporter, tmp_path):
    """Given a batch of 6 prompts and one the upstream fails (REJECT), with a 429 on one
    POST and a 429 and a 503 on status GETs, when it has finished, the exporter's counts
    are the sandbox's and Redis's."""
    # ~3 s generations against the 1 s prior: first polls find them running,
    # so the detection lag (known only after an earlier poll) is measured.
    pipeline = make_pipeline(make_sandbox(time_scale=30))
    pipeline.faults(submit=[429], poll=[429, 503], retry_after=1)
    pipeline.start_workers()
    prompts = [f"metric {i}" for i in range(6)] + ["metric REJECT"]
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", prompts), "m1")
    counts = pipeline.wait_finished("m1", timeout_s=90)
    assert (counts["done"], counts["failed"]) == (6, 1)
    url = exporter(pipeline.env, tmp_path / "logs" / "exporter.log")

    samples = scrape(url)
    ledger = pipeline.ledger()
    stats = requests.get(pipeline.sandbox.url + "/__stats", timeout=10).json()
    requests_total = "vidq_upstream_requests_total"
    # Then: every POST the sandbox accepted, every GET it answered, every download.
    done = [entry for entry in ledger if entry["status"] == "completed"]
    assert value(samples, requests_total, call="submit", outcome="2xx") == len(ledger) == 7
    assert value(samples, requests_total, call="submit", outcome="429") == stats["rate_limited"] >= 1
    assert value(samples, requests_total, call="status", outcome="2xx") == stats["polls"] \
        == sum(entry["polls"] for entry in ledger)
    assert value(samples, requests_total, call="status", outcome="429") == 1
    assert value(samples, requests_total, call="status", outcome="5xx") == 1
    assert value(samples, requests_total, call="download", outcome="2xx") == stats["downloads"] == 6
    assert value(samples, "vidq_upstream_request_seconds_count", call="status",
                 outcome="2xx") == stats["polls"]
    assert value(samples, "vidq_upstream_request_seconds_sum", call="submit", outcome="2xx") > 0
    # Videos and bytes, against the files in storage and the ledger.
    stored = list((tmp_path / "videos" / "m1").glob("*.mp4"))
    assert value(samples, "vidq_downloads_total") == len(stored) == 6
    assert value(samples, "vidq_download_bytes_total") == sum(p.stat().st_size for p in stored) \
        == sum(entry["size"] for entry in done)
    assert value(samples, "vidq_download_seconds_total") > 0
    # Per (model, resolution): one completion per video, GETs per video = the ledger's.
    shape = {"model": "alibaba/wan2.1-t2v-turbo", "resolution": "720P"}
    assert total(samples, "vidq_completions_total", **shape) == 6
    assert value(samples, "vidq_generation_seconds_count", **shape) == 6
    assert value(samples, "vidq_status_gets_per_video_count", **shape) == 6
    assert value(samples, "vidq_status_gets_per_video_sum", **shape) == sum(
        entry["polls"] for entry in done)
    # Lag is known only for videos found after an earlier poll.
    later = total(samples, "vidq_completions_total", seen="later_poll", **shape)
    assert later >= 1 and total(samples, "vidq_detection_lag_seconds_count", **shape) == later
    # Gauges read from Redis.
    for state in ("queued", "submitted", "generating", "downloading", "cancelled"):
        assert value(samples, "vidq_jobs", batch="m1", state=state) == 0
    assert value(samples, "vidq_jobs", batch="m1", state="done") == 6
    assert value(samples, "vidq_jobs", batch="m1", state="failed") == 1
    assert value(samples, "vidq_job_failures_total", kind="generation_failed") == 1
    assert total(samples, "vidq_job_failures_total") == 1
    assert value(samples, "vidq_batch_jobs", batch="m1") == 7
    assert value(samples, "vidq_backlog", batch="m1") == 0
    assert value(samples, "vidq_in_flight") == 0
    assert value(samples, "vidq_cap_configured") == 4
    effective = pipeline.admission.effective_cap()
    assert value(samples, "vidq_cap_effective") == (effective if effective else 4)
    spent = float(pipeline.store.redis.hget(keys.batch("m1"), "credits_spent"))
    assert value(samples, "vidq_batch_credits_spent", batch="m1") == spent >= 6 * CREDITS_PER_VIDEO
    assert value(samples, "vidq_credits_spent_today") == spent
    assert value(samples, "vidq_workers_alive") == 1
    assert value(samples, "vidq_reconciler_resends_total") == 0
    # Bounded labels: no job id and no generation id anywhere.
    ids = set(pipeline.store.job_ids("m1")) | {entry["id"] for entry in ledger}
    labels = {v for (_, ls) in samples for _, v in ls}
    assert not any(i in label for i in ids for label in labels)


def test_reconciler_resends_and_heartbeats_are_counted(make_pipeline, make_sandbox, exporter,
                                                       tmp_path):
    """Given a worker SIGKILLed while it holds countdown polls, when a new worker's
    reconciler re-sends them, the re-send counter equals the re-sends its log shows and
    the live workers are the one left."""
    sandbox = make_sandbox(time_scale=18)  # ~5 s generations
    pipeline = make_pipeline(sandbox, VIDQ_EXPECTED_GENERATION_S=5, VIDQ_POLL_MAX_INTERVAL_S=20)
    pipeline.start_workers()
    url = exporter(pipeline.env, tmp_path / "logs" / "exporter.log")
    assert value(scrape(url), "vidq_workers_alive") == 1
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"lost {i}" for i in range(3)]), "m2")
    pipeline.wait_polls_held("m2", 3)
    os.killpg(os.getpgid(pipeline.processes[0].pid), signal.SIGKILL)
    pipeline.processes[0].wait()
    pipeline.processes = []
    pipeline.start_workers()

    assert pipeline.wait_finished("m2", timeout_s=60)["done"] == 3
    samples = scrape(url)
    log = (tmp_path / "logs" / "worker-0.log").read_text(errors="replace")
    resends = log.count("(its chain was lost)")
    assert resends >= 3
    assert value(samples, "vidq_reconciler_resends_total") == resends
    assert value(samples, "vidq_workers_alive") == 1
    (age,) = [v for (n, _), v in samples.items() if n == "vidq_worker_heartbeat_age_seconds"]
    assert 0 <= age <= 1.5  # VIDQ_HEARTBEAT_INTERVAL_S=0.5: the key lives 1.5 s


def silent_server() -> tuple[socket.socket, str]:
    """Accepts connections and never answers: a status GET times out reading."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return listener, f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_upstream_failures_are_counted_by_kind(redis_url, serve_bytes):
    """Given real servers that answer a non-JSON body, refuse the connection and never
    answer, the status GETs are counted as bad_body, network and timeout."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    RECORDER.flush(client)  # whatever this test process counted before is not ours
    client.delete(keys.METRICS)
    listener, silent = silent_server()
    bases = {"bad_body": serve_bytes(b"<html>busy</html>"),
             "network": f"http://127.0.0.1:{free_port()}", "timeout": silent}
    for base in bases.values():
        upstream = UpstreamClient(Settings(api_key="sk-metrics", base_url=base,
                                           redis_url=redis_url, http_timeout_s=0.5))
        with pytest.raises((BadResponse, UpstreamUnavailable)):
            upstream.fetch("gen-1")
    listener.close()
    RECORDER.flush(client)

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in registry_for(Settings(redis_url=redis_url)).collect()
               for s in family.samples}
    for outcome in bases:
        assert value(samples, "vidq_upstream_requests_total", call="status", outcome=outcome) == 1
    assert total(samples, "vidq_upstream_requests_total") == 3


def test_without_redis_a_scrape_says_so_and_the_exporter_recovers(restartable_redis, exporter,
                                                                   tmp_path):
    """Redis stopped: the scrape answers 200 with vidq_redis_up 0 and no partial figures;
    Redis back: the same exporter serves everything again."""
    env = dict(os.environ, VIDQ_REDIS_URL=restartable_redis.url)
    url = exporter(env, tmp_path / "exporter.log")
    assert value(scrape(url), "vidq_redis_up") == 1
    restartable_redis.stop()
    down = scrape(url)
    assert {name for name, _ in down} == {"vidq_redis_up"} and value(down, "vidq_redis_up") == 0
    restartable_redis.start()
    back = scrape(url)
    assert value(back, "vidq_redis_up") == 1 and value(back, "vidq_in_flight") == 0
    assert "scrape without Redis: ConnectionError" in (tmp_path / "exporter.log").read_text()


def test_metrics_on_a_busy_port_is_one_error_line(redis_url, tmp_path):
    """A port already taken: one `error:` line and exit status 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, VIDQ_REDIS_URL=redis_url)
        result = subprocess.run(["vidq", "metrics", "--port", str(port)], env=env,
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --port {port}: cannot listen")
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_webhook_only_pool_is_not_counted_as_a_live_worker(make_pipeline, exporter, tmp_path):
    """Only a webhook pool is up: no job moves, so an alert on
    `vidq_workers_alive == 0` must fire, as `vidq status` warns; the pool's
    heartbeat age is still shown."""
    from worker.celery_app import WEBHOOK_QUEUE

    pipeline = make_pipeline()
    pipeline.start_workers(queues=[WEBHOOK_QUEUE])
    url = exporter(pipeline.env, tmp_path / "logs" / "exporter.log")

    samples = scrape(url)

    assert value(samples, "vidq_workers_alive") == 0
    assert [n for (n, _) in samples if n == "vidq_worker_heartbeat_age_seconds"] == [
        "vidq_worker_heartbeat_age_seconds"]
