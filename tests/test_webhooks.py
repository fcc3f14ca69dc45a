"""Webhooks: real workers deliver the event stream to a real local receiver
(an HTTP server thread) that checks every Standard Webhooks signature and
fails deliveries on purpose."""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
import requests
from conftest import write_prompts
from test_security import redis_contents

from worker import webhooks
from worker.errors import ConfigError
from worker.keys import EVENTS
from worker.settings import Settings
from worker.webhook_signing import secret_key, sign, verify

SECRET = "whsec_" + "c2VjcmV0LWtleS1mb3ItdmlkcS13ZWJob29rLXRlc3Rz"  # 33 bytes
PROMPTS = ["a heron in reeds", "REJECT me", "city lights in rain"]


class Receiver:
    """A local webhook endpoint: verifies each signature, records each body by
    path and webhook-id, and answers what `answers(path, attempt)` says."""

    def __init__(self, answers):
        self.answers = answers
        self.received: dict[str, dict[str, list[dict]]] = {}
        self.bad_signatures: list[str] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.record(self.path, dict(self.headers), body)
                status = receiver.answer(self.path, self.headers["webhook-id"])
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def record(self, path: str, headers: dict, body: bytes) -> None:
        headers = {k.lower(): v for k, v in headers.items()}
        ok = verify(secret_key(SECRET), headers["webhook-id"], headers["webhook-timestamp"],
                    body, headers["webhook-signature"])
        fresh = abs(time.time() - int(headers["webhook-timestamp"])) < 300
        with self.lock:
            if not (ok and fresh):
                self.bad_signatures.append(headers["webhook-id"])
            self.received.setdefault(path, {}).setdefault(headers["webhook-id"], []).append(
                json.loads(body))

    def answer(self, path: str, message_id: str) -> int:
        with self.lock:
            attempt = len(self.received[path][message_id])
        return self.answers(path, attempt)

    def ids(self, path: str) -> set[str]:
        with self.lock:
            return set(self.received.get(path, {}))


@pytest.fixture
def receiver():
    made = []

    def start(answers) -> Receiver:
        made.append(Receiver(answers))
        return made[-1]

    yield start
    for r in made:
        r.server.shutdown()


def _vidq(pipeline, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["vidq", *args], env=pipeline.env, capture_output=True, text=True,
                          timeout=60)


def _webhook_pipeline(make_pipeline, receiver_url: str, tmp_path, batch: str, **env):
    pipeline = make_pipeline(VIDQ_WEBHOOK_SECRET=SECRET, VIDQ_WEBHOOK_ALLOWLIST="127.0.0.1",
                             VIDQ_WEBHOOK_BACKOFF_BASE_S="0.3", **env)
    pipeline.start_workers(1, concurrency=4)  # every queue, vidq.webhook too
    prompts = write_prompts(tmp_path / f"{batch}.txt", PROMPTS)
    result = _vidq(pipeline, "enqueue", str(prompts), "--batch", batch,
                   "--webhook", receiver_url + "/batch")
    assert result.returncode == 0, result.stderr
    pipeline.wait_finished(batch)
    return pipeline


def _stream_ids(pipeline, timeout_s: float = 30.0) -> set[str]:
    client = redis.Redis.from_url(pipeline.env["VIDQ_REDIS_URL"], decode_responses=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = client.xrange(EVENTS)
        if any(f["type"] == "batch.finished" for _, f in found):
            return {event_id for event_id, _ in found}
        time.sleep(0.2)
    raise AssertionError("no batch.finished event")


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_every_event_arrives_signed_at_both_urls_through_503s(make_pipeline, receiver,
                                                             tmp_path):
    """Given a deployment URL that answers 503 to each first attempt and a batch
    URL that accepts, every event arrives at both, every signature verifies,
    the failed attempts are retried, and `vidq webhooks` lists them delivered."""
    r = receiver(lambda path, attempt: 503 if path == "/deploy" and attempt == 1 else 200)
    pipeline = _webhook_pipeline(make_pipeline, r.url, tmp_path, "wh1",
                                 VIDQ_WEBHOOK_URL=r.url + "/deploy")
    ids = _stream_ids(pipeline)
    assert len(ids) == 4  # two videos, one failure, the batch's end
    _wait(lambda: r.ids("/deploy") == ids and r.ids("/batch") == ids
          and all(len(r.received["/deploy"][i]) == 2 for i in ids), 60, "every event twice")
    assert r.bad_signatures == []
    assert {len(bodies) for bodies in r.received["/deploy"].values()} == {2}  # 503, then 200
    bodies = [b[0] for b in r.received["/batch"].values()]
    assert sorted(b["type"] for b in bodies) == ["batch.finished", "job.failed",
                                                 "video.stored", "video.stored"]
    assert all(b["v"] == 1 and b["data"]["batch"] == "wh1" for b in bodies)
    _wait(lambda: _vidq(pipeline, "webhooks", "wh1").returncode == 0, 30, "all delivered")
    listing = _vidq(pipeline, "webhooks", "wh1")
    assert "8 webhook deliveries: 8 delivered, 0 pending, 0 failed" in listing.stdout
    rows = json.loads(_vidq(pipeline, "webhooks", "wh1", "--json").stdout)["deliveries"]
    assert sorted((row["target"], row["attempts"]) for row in rows) == (
        [("batch", 1)] * 4 + [("deployment", 2)] * 4)
    _assert_secret_nowhere(pipeline)


def _assert_secret_nowhere(pipeline) -> None:
    """Neither the secret nor its key bytes in the worker logs or anywhere in Redis."""
    needles = [SECRET, SECRET.removeprefix("whsec_"), secret_key(SECRET).decode("latin-1")]
    logs = "".join(p.read_text(errors="replace") for p in pipeline.log_dir.glob("*.log"))
    # Values as stored, message bodies decoded: a DUMP is LZF-compressed, in
    # which no needle this long could be found (helper 106).
    stored = redis_contents(pipeline.env["VIDQ_REDIS_URL"])
    for needle in needles:
        assert needle not in logs
        assert not [value for value in stored if needle.encode("latin-1") in value]


def test_failed_deliveries_are_listed_and_replayed(make_pipeline, receiver, tmp_path):
    """Given a batch URL that refuses everything (410), its deliveries fail at
    once and `vidq webhooks` lists them (exit 1); once the receiver accepts,
    `--replay` sends them again with the same webhook-id and they arrive."""
    accepting = threading.Event()
    r = receiver(lambda path, attempt: 200 if accepting.is_set() else 410)
    pipeline = _webhook_pipeline(make_pipeline, r.url, tmp_path, "wh2")
    ids = _stream_ids(pipeline)
    _wait(lambda: "4 failed" in _vidq(pipeline, "webhooks", "wh2").stdout, 30, "4 failures")
    listing = _vidq(pipeline, "webhooks", "wh2")
    assert listing.returncode == 1
    assert "4 webhook deliveries: 0 delivered, 0 pending, 4 failed" in listing.stdout
    assert listing.stdout.count("HTTP 410") == 4
    accepting.set()
    replay = _vidq(pipeline, "webhooks", "wh2", "--replay")
    assert "4 failed ones sent again" in replay.stdout, replay.stdout + replay.stderr
    _wait(lambda: all(len(r.received["/batch"][i]) == 2 for i in ids), 30, "the replays")
    assert r.ids("/batch") == ids and r.bad_signatures == []
    _wait(lambda: _vidq(pipeline, "webhooks", "wh2").returncode == 0, 30, "all delivered")


def test_a_loopback_url_is_refused_unless_allowed(receiver):
    """The SSRF guard refuses a private webhook URL (nothing is sent) unless
    VIDQ_WEBHOOK_ALLOWLIST names it."""
    r = receiver(lambda path, attempt: 200)
    record = {"url": r.url + "/x", "event_id": "1-0", "body": "{}"}
    refused = webhooks.attempt_post(Settings(webhook_secret=SECRET), requests.Session(), record)
    assert refused.state == "failed" and "non-public address" in refused.error
    assert r.ids("/x") == set()
    allowed = webhooks.attempt_post(
        Settings(webhook_secret=SECRET, webhook_allowlist="127.0.0.1"), requests.Session(),
        record)
    assert allowed.state == "delivered" and r.ids("/x") == {"1-0"}


def test_signatures_match_the_standard_webhooks_test_vector():
    """The specification's published example signs to its published value."""
    key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    assert sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                b'{"test": 2432232314}') == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_a_bad_secret_is_refused_without_showing_it():
    """A malformed secret names the variable, never the value."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"VIDQ_WEBHOOK_SECRET": "whsec_not-base64!!"})
    assert "VIDQ_WEBHOOK_SECRET" in str(caught.value)
    assert "not-base64" not in str(caught.value)
    assert "webhook_secret" not in repr(Settings(webhook_secret=SECRET))


def test_a_bad_webhook_flag_exits_2_and_enqueues_nothing(redis_url, tmp_path):
    """`vidq enqueue --webhook` with no http(s) host: one error line, exit 2."""
    prompts = write_prompts(tmp_path / "p.txt", ["a cat"])
    env = {**os.environ, "VIDQ_REDIS_URL": redis_url}
    result = subprocess.run(["vidq", "enqueue", str(prompts), "--batch", "wh3", "--webhook",
                             "ftp://example.com/x"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --webhook:") and result.stderr.count("\n") == 1
    assert redis.Redis.from_url(redis_url).exists("vidq:batch:wh3") == 0


def test_a_webhook_batch_is_refused_while_a_live_deliverer_cannot_sign(make_pipeline,
                                                                       receiver, tmp_path):
    """`--webhook` with no worker up: enqueued, with a warning. With a live
    worker consuming vidq.webhook and no VIDQ_WEBHOOK_SECRET (whose log says
    so at start, as VIDQ_WEBHOOK_URL is set): exit 2, nothing enqueued,
    instead of every delivery failing "not sent" overnight. Once restarted
    with the secret, the same enqueue goes through."""
    url = receiver(lambda path, attempt: 200).url
    pipeline = make_pipeline(VIDQ_WEBHOOK_URL=url + "/deployment")
    prompts = write_prompts(tmp_path / "p.txt", ["a cat"])
    early = _vidq(pipeline, "enqueue", str(prompts), "--batch", "wh-early", "--webhook", url)
    assert early.returncode == 0, early.stderr
    assert "no live worker consumes vidq.webhook" in early.stderr
    pipeline.start_workers(1, concurrency=2)
    assert "it has no VIDQ_WEBHOOK_SECRET" in (pipeline.log_dir / "worker-0.log").read_text()
    refused = _vidq(pipeline, "enqueue", str(prompts), "--batch", "wh-late", "--webhook", url)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: --webhook: the live worker(s) test0@")
    assert "without VIDQ_WEBHOOK_SECRET" in refused.stderr and refused.stderr.count("\n") == 1
    client = redis.Redis.from_url(pipeline.env["VIDQ_REDIS_URL"])
    assert client.exists("vidq:batch:wh-late") == 0 and client.exists("vidq:batch:wh-early")

    # Restarted with the secret: the stopped worker's record (kept a minute
    # for C) refuses nothing, and no warning is due.
    pipeline.stop_workers()
    pipeline.env["VIDQ_WEBHOOK_SECRET"] = SECRET
    pipeline.log_dir = tmp_path / "logs-signed"
    pipeline.log_dir.mkdir()
    pipeline.start_workers(1, concurrency=2)
    signed = _vidq(pipeline, "enqueue", str(prompts), "--batch", "wh-late", "--webhook", url)
    assert signed.returncode == 0 and "warning" not in signed.stderr, signed.stderr


def test_a_relay_that_dies_midway_is_redone_without_duplicate_deliveries(redis_url):
    """Given a relay pass that dies after its first task, the next pass redoes
    the unacknowledged events: every delivery exists once and is sent, and the
    one already sent is sent again only as a duplicate its claim refuses."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    for n in range(3):
        client.xadd(EVENTS, {"v": "1", "type": "job.failed", "batch": "wh4", "n": str(n)})
    settings = Settings(redis_url=redis_url, webhook_url="https://example.com/hook")
    sent: list[tuple[str, int]] = []

    def dies_after_one(ident: str, attempt: int, countdown: float) -> None:
        if sent:
            raise ConnectionError("broker gone")
        sent.append((ident, attempt))

    with pytest.raises(ConnectionError):
        webhooks.relay(client, settings, dies_after_one)
    webhooks.relay(client, settings, lambda i, a, c: sent.append((i, a)))
    records = webhooks.deliveries(client, "wh4")
    assert len(records) == 3 and {r["state"] for r in records} == {"pending"}
    assert {i for i, _ in sent} == {r["id"] for r in records}
    assert client.xpending(EVENTS, webhooks.GROUP)["pending"] == 0
    first = sent[0][0]
    assert webhooks.claim(client, first, 0) is not None  # one message of attempt 0 wins
    assert webhooks.claim(client, first, 0) is None  # its duplicate does nothing


def test_a_delivery_failing_past_the_retry_window_fails(redis_url, receiver):
    """A 503 is retried with a countdown while within VIDQ_WEBHOOK_RETRY_FOR_S,
    and failed, with its attempts counted, once the next try would be past it."""
    r = receiver(lambda path, attempt: 503)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.xadd(EVENTS, {"v": "1", "type": "job.failed", "batch": "wh5"})
    env = {"webhook_url": r.url + "/h", "webhook_secret": SECRET,
           "webhook_allowlist": "127.0.0.1", "webhook_backoff_base_s": 5.0}
    sent: list[tuple[str, int, float]] = []
    webhooks.relay(client, Settings(redis_url=redis_url, **env),
                   lambda i, a, c: sent.append((i, a, c)))
    ((ident, _, _),) = sent
    patient = Settings(redis_url=redis_url, webhook_retry_for_s=3600, **env)
    retry = webhooks.deliver(client, patient, requests.Session(), ident, 0,
                             lambda i, a, c: sent.append((i, a, c)))
    assert retry is not None and retry.state == "pending" and 4.0 <= sent[-1][2] <= 5.0
    hurried = Settings(redis_url=redis_url, webhook_retry_for_s=1, **env)
    given_up = webhooks.deliver(client, hurried, requests.Session(), ident, 1,
                                lambda i, a, c: sent.append((i, a, c)))
    assert given_up is not None and given_up.state == "failed"
    assert "gave up after 2 attempts: HTTP 503" in given_up.error and len(sent) == 2
    assert len(r.received["/h"]) == 1 and len(next(iter(r.received["/h"].values()))) == 2


def test_webhooks_of_an_unknown_batch_exits_2_with_one_line(redis_url):
    """`vidq webhooks NAME` for a batch Redis has never seen: one error line, exit 2."""
    result = subprocess.run(["vidq", "webhooks", "nope"], capture_output=True, text=True,
                            env={**os.environ, "VIDQ_REDIS_URL": redis_url}, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: no batch 'nope' (and no webhook deliveries for it)\n"


@pytest.mark.slow
def test_a_receiver_that_is_down_does_not_stop_the_batch_of_a_worker_sending_both(
        make_pipeline, make_sandbox, receiver, tmp_path):
    """One worker on every queue (the README's start line, the image's default)
    and a receiver answering 503: each delivery awaiting its retry is a
    countdown message, so they filled the limit sized for polls (3C + 16),
    kombu's prefetch count shrank with each one that arrived at it, and the
    worker fetched no polls: both slots taken, nothing upstream, 2 videos in
    80 s (review 97)."""
    from conftest import write_prompts

    r = receiver(lambda path, attempt: 503)
    pipeline = make_pipeline(make_sandbox(max_concurrency=2), VIDQ_MAX_IN_FLIGHT="2",
                             VIDQ_WEBHOOK_SECRET=SECRET, VIDQ_WEBHOOK_ALLOWLIST="127.0.0.1",
                             VIDQ_WEBHOOK_URL=r.url + "/down", VIDQ_WEBHOOK_BACKOFF_BASE_S="5")
    pipeline.start_workers(1, concurrency=2)
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"clip {i}" for i in range(60)]), "wb")
    assert pipeline.wait_finished("wb", timeout_s=150)["done"] == 60
    pipeline.stop_workers()
