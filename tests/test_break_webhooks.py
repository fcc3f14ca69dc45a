"""Breaking the webhook promises (issue 14): at least once even when the worker
running an attempt is SIGKILLed, signatures valid by an independent Standard
Webhooks implementation, redirects to private addresses never followed, and a
batch name that is also a key name of the relay."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
import requests

from worker import keys, webhooks
from worker.keys import EVENTS
from worker.settings import Settings

SECRET = "whsec_" + base64.b64encode(b"break-14-webhook-secret-32-bytes").decode()


def spec_verify(secret: str, headers: dict, body: bytes) -> bool:
    """Standard Webhooks verification written from the specification (not vidq's
    code), and by the `standardwebhooks` package too when it is installed."""
    headers = {k.lower(): v for k, v in headers.items()}
    key = base64.b64decode(secret.removeprefix("whsec_"))
    msg_id, stamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(stamp)) > 300:
        return False
    expected = base64.b64encode(hmac.new(key, f"{msg_id}.{stamp}.{body.decode()}".encode(),
                                         hashlib.sha256).digest()).decode()
    ours = any(version == "v1" and hmac.compare_digest(sig, expected)
               for version, _, sig in (s.partition(",")
                                       for s in headers["webhook-signature"].split(" ")))
    try:
        from standardwebhooks.webhooks import Webhook
    except ImportError:
        return ours
    try:
        Webhook(secret).verify(body, headers)
    except Exception:  # noqa: BLE001 - any refusal is a bad signature
        return False
    return ours


class Receiver:
    """A local endpoint; `hold` (if set) is waited on before answering the first
    request of each webhook-id, so a test can kill the worker mid-attempt."""

    def __init__(self, host: str = "127.0.0.1", status: int = 200, location: str = ""):
        self.requests: list[tuple[str, dict, bytes]] = []
        self.first_seen = threading.Event()
        self.hold: threading.Event | None = None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = dict(self.headers)
                first = not any(h.get("webhook-id") == headers.get("webhook-id")
                                for _, h, _ in outer.requests)
                outer.requests.append((self.path, headers, body))
                outer.first_seen.set()
                if first and outer.hold is not None:
                    outer.hold.wait(30)
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://{host}:{self.server.server_port}"

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def start(**options) -> Receiver:
        made.append(Receiver(**options))
        return made[-1]

    yield start
    for receiver in made:
        receiver.close()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_a_delivery_whose_pool_child_is_killed_mid_attempt_is_sent_again(make_pipeline,
                                                                          receivers):
    """Given a receiver that holds the first POST of an event and the pool child
    making it SIGKILLed meanwhile (its message comes back, finds its attempt
    taken), the delivery is still made: sent again once its lease ran out, with a
    signature an independent Standard Webhooks verifier accepts."""
    receiver = receivers()
    receiver.hold = threading.Event()
    pipeline = make_pipeline(VIDQ_WEBHOOK_SECRET=SECRET, VIDQ_WEBHOOK_ALLOWLIST="127.0.0.1",
                             VIDQ_WEBHOOK_URL=receiver.url + "/hook", VIDQ_WEBHOOK_TIMEOUT_S=4,
                             VIDQ_WEBHOOK_BACKOFF_BASE_S=0.3)
    client = redis.Redis.from_url(pipeline.env["VIDQ_REDIS_URL"], decode_responses=True)
    event_id = client.xadd(EVENTS, {"v": "1", "type": "job.failed", "at": "1764107000.5",
                                    "batch": "wk", "job": "wk:a", "custom_id": "a",
                                    "generation_id": "", "reason": "boom",
                                    "outcome_unknown": "0"})
    pipeline.start_workers(1, concurrency=2)
    assert receiver.first_seen.wait(30), "no delivery attempt"
    main = pipeline.processes[0].pid
    for child in _children(main):
        os.kill(child, signal.SIGKILL)
    receiver.hold.set()  # the killed attempt's connection is gone: nothing was delivered

    ident = webhooks.delivery_id("deployment", event_id)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if client.hget(keys.webhook_delivery(ident), "state") == "delivered":
            break
        time.sleep(0.2)
    record = client.hgetall(keys.webhook_delivery(ident))
    assert record.get("state") == "delivered", (record, len(receiver.requests))
    assert len(receiver.requests) >= 2
    for path, headers, body in receiver.requests:
        assert path == "/hook" and headers["webhook-id"] == event_id
        assert spec_verify(SECRET, headers, body), headers
        assert json.loads(body)["data"]["reason"] == "boom"
    assert client.zscore(keys.WEBHOOKS_DUE, ident) is None  # settled: no longer watched
    log = (pipeline.log_dir / "worker-0.log").read_text(errors="replace")
    assert "its attempt was lost; sent again" in log
    assert SECRET.removeprefix("whsec_") not in log


def test_a_redirect_to_a_private_address_is_not_followed(redis_url, receivers):
    """Given an allowed receiver that answers 307 to a loopback address not
    allowed (which would get the signed POST again if followed), the delivery
    fails at once naming the 307, and the other address receives nothing; a
    URL naming that address directly, even as a decimal integer, is refused."""
    inner = receivers(host="127.0.0.2")
    outer = receivers(status=307, location=inner.url + "/steal")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.xadd(EVENTS, {"v": "1", "type": "job.failed", "batch": "ssrf", "reason": "x"})
    sent: list[tuple[str, int, float]] = []
    settings = Settings(redis_url=redis_url, webhook_url=outer.url + "/hook",
                        webhook_secret=SECRET, webhook_allowlist="127.0.0.1")
    webhooks.relay(client, settings, lambda i, a, c: sent.append((i, a, c)))
    ((ident, attempt, _),) = sent
    outcome = webhooks.deliver(client, settings, requests.Session(), ident, attempt,
                               lambda i, a, c: sent.append((i, a, c)))
    assert outcome is not None and (outcome.state, outcome.status) == ("failed", 307)
    assert len(outer.requests) == 1 and spec_verify(SECRET, outer.requests[0][1],
                                                    outer.requests[0][2])
    assert inner.requests == [] and len(sent) == 1
    port = inner.server.server_port
    for url in (inner.url + "/direct", f"http://2130706434:{port}/direct"):  # 127.0.0.2
        direct = Settings(redis_url=redis_url, webhook_url=url, webhook_secret=SECRET,
                          webhook_allowlist="127.0.0.1")
        record = {"url": url, "event_id": "1-0", "body": "{}"}
        refused = webhooks.attempt_post(direct, requests.Session(), record)
        assert refused.state == "failed" and "non-public address" in refused.error, refused
    assert inner.requests == []


def test_a_batch_named_relay_gets_its_deliveries_listed(redis_url):
    """The relay's lock used to be vidq:webhooks:relay, the key of the deliveries
    of a batch named "relay": its relay pass failed with WRONGTYPE and `vidq
    webhooks relay` listed nothing. Its deliveries are made and listed."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.xadd(EVENTS, {"v": "1", "type": "job.failed", "batch": "relay", "reason": "x"})
    settings = Settings(redis_url=redis_url, webhook_url="https://example.com/hook")
    sent: list[str] = []
    webhooks.relay(client, settings, lambda i, a, c: sent.append(i))
    records = webhooks.deliveries(client, "relay")
    assert [r["id"] for r in records] == sent and len(sent) == 1
    assert client.xpending(EVENTS, webhooks.GROUP)["pending"] == 0


class _PipelineDiesOnce(redis.Redis):
    """Redis as seen by a relay whose connection dies at its first pipeline."""

    died = False

    def pipeline(self, *args, **kwargs):
        if not _PipelineDiesOnce.died:
            _PipelineDiesOnce.died = True
            raise redis.ConnectionError("Redis went away")
        return super().pipeline(*args, **kwargs)


def test_a_relay_dying_while_it_writes_a_record_leaves_none_unsent(redis_url):
    """A relay pass whose Redis goes away while it writes a delivery record (the
    record used to be begun with HSETNX, then filled by a pipeline: a record of
    its id alone was left, neither sent nor ever tried): the next pass makes the
    delivery and sends it."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.xadd(EVENTS, {"v": "1", "type": "job.failed", "batch": "half", "reason": "x"})
    settings = Settings(redis_url=redis_url, webhook_url="https://example.com/hook")
    sent: list[tuple[str, int]] = []
    with pytest.raises(redis.ConnectionError):
        webhooks.relay(_PipelineDiesOnce.from_url(redis_url, decode_responses=True), settings,
                       lambda i, a, c: sent.append((i, a)))
    assert sent == []
    webhooks.relay(client, settings, lambda i, a, c: sent.append((i, a)))
    ((ident, attempt),) = sent
    record = client.hgetall(keys.webhook_delivery(ident))
    assert (record["state"], attempt, record["url"]) == ("pending", 0,
                                                         "https://example.com/hook")
    assert [r["id"] for r in webhooks.deliveries(client, "half")] == [ident]
