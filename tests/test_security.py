"""Secrets stay secret, result URLs cannot reach inside, names cannot escape their prefix.

Real parts only: the test Redis, `celery` worker processes, the sandbox (or a
hostile stand-in upstream) over HTTP, and the `vidq` command as a subprocess.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
from conftest import write_prompts

from sandbox.videos import render_clip
from worker.keys import job_ref

CANARY_KEY = "sk-vidq-canary-7Q2x9"
WRONG_KEY = "sk-wrong-canary-5512"


# -- helpers ------------------------------------------------------------------------------


def _expand(raw: bytes, found: list[bytes]) -> None:
    """Add `raw` and, if it is a (Celery/kombu) JSON message, every base64 body inside it."""
    found.append(raw)
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return
    stack = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for name, value in item.items():
                if name == "body" and isinstance(value, str):
                    with contextlib.suppress(binascii.Error, ValueError):
                        _expand(base64.b64decode(value, validate=True), found)
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and item[:1] in "{[":
            _expand(item.encode(), found)


def redis_contents(url: str) -> list[bytes]:
    """Every key name and value in the Redis at `url`, message bodies decoded."""
    client = redis.Redis.from_url(url)
    found: list[bytes] = []
    for key in client.scan_iter(count=1000):
        found.append(key)
        kind = client.type(key).decode()
        if kind == "none":  # gone since the SCAN (a message taken, a lock released)
            continue
        if kind == "string":
            values = [client.get(key) or b""]  # None if gone meanwhile
        elif kind == "hash":
            values = [part for pair in client.hgetall(key).items() for part in pair]
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = client.zrange(key, 0, -1)
        elif kind == "stream":
            values = [part for _, fields in client.xrange(key) for pair in fields.items()
                      for part in pair]
        else:
            raise AssertionError(f"key {key!r} of unexpected type {kind}")
        for value in values:
            _expand(value, found)
    return found


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def media_under(path: Path) -> list[Path]:
    """Videos and sidecars: every file but a batch's manifest.jsonl and errors.jsonl
    (and their temporary names while they are being written, as the last job ends)."""
    return [p for p in files_under(path) if ".jsonl" not in p.name]


def assert_nowhere(secret: str, pipeline, tmp_path: Path) -> None:
    needle = secret.encode()
    logs = files_under(pipeline.log_dir)
    assert logs, "no worker logs to search"
    for path in logs + files_under(tmp_path / "videos"):
        assert needle not in path.read_bytes(), f"{secret!r} found in {path}"
    contents = redis_contents(pipeline.settings.redis_url)
    assert contents, "nothing in Redis to search"
    leaks = [value[:200] for value in contents if needle in value]
    assert not leaks, f"{secret!r} found in Redis: {leaks}"


def jobs_of(pipeline, batch: str) -> list:
    return [pipeline.store.get(job_ref(batch, i)) for i in pipeline.store.job_ids(batch)]


# -- a) the API key appears nowhere -------------------------------------------------------


def test_api_key_appears_nowhere(make_sandbox, make_pipeline, tmp_path):
    """After a batch with a success and a failure, the key is in no log, sidecar,
    Redis key or value (Celery messages included) and no job's last_error."""
    sandbox = make_sandbox(api_key=CANARY_KEY)
    pipeline = make_pipeline(sandbox)
    assert pipeline.env["AIMLAPI_KEY"] == CANARY_KEY
    pipeline.start_workers()
    prompts = ["a canary in a coal mine", "a quiet harbour", "three paper boats",
               "please REJECT this one"]
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", prompts), "secret")
    # Sample Redis while the batch runs too: messages in flight (queued, countdown
    # polls held unacked) are gone once it ends.
    seen: list[bytes] = []
    while pipeline.store.counts("secret")["done"] + pipeline.store.counts("secret")["failed"] < 4:
        seen.extend(redis_contents(pipeline.settings.redis_url))
        time.sleep(0.05)

    counts = pipeline.wait_finished("secret")

    assert (counts["done"], counts["failed"]) == (3, 1)
    assert len(media_under(tmp_path / "videos" / "secret")) == 6  # 3 videos + 3 sidecars
    for job in jobs_of(pipeline, "secret"):
        assert CANARY_KEY not in job.last_error
        assert CANARY_KEY not in json.dumps(job.__dict__, default=str)
    assert_nowhere(CANARY_KEY, pipeline, tmp_path)
    # Celery message bodies (base64 in the kombu envelope) were decoded and searched.
    assert any(value.startswith(b'[["secret:') for value in seen)
    assert not [value[:200] for value in seen if CANARY_KEY.encode() in value]


def test_wrong_api_key_fails_with_401_and_is_never_written(make_sandbox, make_pipeline,
                                                           tmp_path):
    """A wrong key fails the job with the 401 reason; the key is in no log, Redis or reason."""
    pipeline = make_pipeline(make_sandbox(api_key=CANARY_KEY), AIMLAPI_KEY=WRONG_KEY)
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["a locked door"]), "wrongkey")

    counts = pipeline.wait_finished("wrongkey")

    assert counts["failed"] == 1
    (job,) = jobs_of(pipeline, "wrongkey")
    assert "401" in job.last_error, job.last_error
    assert WRONG_KEY not in job.last_error and CANARY_KEY not in job.last_error
    assert not job.generation_id
    assert pipeline.sandbox.stats()["submissions"] == 0
    assert_nowhere(WRONG_KEY, pipeline, tmp_path)


@pytest.mark.slow
def test_a_key_quoted_back_by_the_upstream_is_redacted_everywhere(make_sandbox, make_pipeline,
                                                                  hostile_upstream, tmp_path):
    """A 401, a 500, failed generations and a cut message that quote the key: each job
    fails with the upstream's reason, the key replaced by [redacted], and the key
    is in no log, Redis key or value (events and Celery messages included)."""
    pipeline = make_pipeline(make_sandbox(), AIMLAPI_BASE_URL=hostile_upstream.url,
                             AIMLAPI_KEY=CANARY_KEY)
    pipeline.start_workers()
    prompts = ["echo 401", "echo 500", "echo failed", "echo at once", "echo cut", "echo cut 500",
               "echo noid", "echo wrapped", "echo gateway cut", "echo json wrapped"]
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", prompts), "echo")

    counts = pipeline.wait_finished("echo", timeout_s=60)

    assert counts["failed"] == 10, counts
    reasons = sorted(job.last_error for job in jobs_of(pipeline, "echo"))
    # The key goes before the message is cut to 500 characters, so a cut leaves no
    # head of it ("echo cut" keeps "[reda" of the mark, "echo cut 500" all of it).
    assert len([r for r in reasons if "Incorrect API key provided: [redacted]" in r]) == 6, \
        reasons
    assert all(CANARY_KEY[:4] not in reason and CANARY_KEY[-6:] not in reason
               for reason in reasons), reasons
    assert len([r for r in reasons if "[redacted]" in r]) == 9, reasons  # "echo cut": "[reda"
    assert_nowhere(CANARY_KEY, pipeline, tmp_path)


# -- b) result URLs: SSRF guard and size cap ----------------------------------------------

HOSTILE_URLS = {
    "file": "file:///etc/passwd",
    "metadata": "http://169.254.169.254/latest/meta-data/?X-Amz-Signature=secret123",
    "private": "http://10.1.2.3/x.mp4",
    "mapped": "http://[::ffff:169.254.169.254]/",
    "gopher": "gopher://127.0.0.1/",
    "redirect": None,  # /redirect on the hostile server itself: 302 to the metadata address
}


class HostileUpstream:
    """Accepts every POST, then reports each generation completed with a hostile URL.
    A prompt 'echo 401' or 'echo 500' is answered with that status, 'echo failed'
    with a generation that fails, 'echo at once' with one failed in the POST's own
    answer, 'echo noid' with a 2xx without an id, and 'echo cut' with a 401 whose key
    is cut by vidq's 500-character cap:
    each quotes the key it was sent, as some gateways do."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.urls: dict[str, str] = {}  # generation id -> result URL
        self.echoed: dict[str, str] = {}  # generation id -> its failure, quoting the key
        self.loop_hops = 0  # /loop redirects to itself this many times, then serves `video`
        self.video = b""
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _json(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                owner.requests.append(("POST", self.path))
                length = int(self.headers.get("Content-Length") or 0)
                prompt = json.loads(self.rfile.read(length))["prompt"]
                if self.path != "/v2/video/generations":
                    return self._json(404, {"message": "not found"})
                echoed = f"Incorrect API key provided: {self.headers['Authorization'][7:]}"
                if prompt in ("echo 401", "echo 500"):
                    return self._json(int(prompt[-3:]), {"message": echoed})
                if prompt == "echo cut":  # 5 characters of the key fit in 500
                    return self._json(401, {"message": "x" * 467 + echoed})
                if prompt == "echo cut 500":  # 10 fit, then vidq's own words follow
                    return self._json(500, {"message": "x" * 462 + echoed})
                key = echoed.removeprefix("Incorrect API key provided: ")
                if prompt == "echo wrapped":  # an HTML page, the key over two lines
                    page = f"<p>Invalid key {key[:10]}\n {key[10:]}</p>".encode()
                    self.send_response(401)
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    return self.wfile.write(page)
                if prompt == "echo gateway cut":  # the gateway's own cut: a head of it
                    return self._json(401, {"message": f"Bad key {key[:12]}..."})
                if prompt == "echo json wrapped":  # no message field: the body is quoted
                    return self._json(400, {"note": f"Invalid key {key[:10]}\n {key[10:]}"})
                if prompt == "echo noid":  # a 2xx without an id, quoted cut at 200
                    return self._json(200, {"note": "x" * 150 + echoed})
                if prompt == "echo at once":
                    return self._json(200, {"id": "g-now", "status": "error",
                                            "error": {"message": echoed}})
                if prompt == "echo failed":
                    owner.echoed["g-failed"] = echoed
                self._json(200, {"id": f"g-{prompt.split()[-1]}", "status": "queued"})

            def do_GET(self):
                owner.requests.append(("GET", self.path))
                if self.path.startswith("/loop") and owner.loop_hops > 0:
                    owner.loop_hops -= 1  # a CDN redirecting to itself, for a while
                    self.send_response(302)
                    self.send_header("Location", "/loop")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path.startswith("/loop"):
                    self.send_response(200)
                    self.send_header("Content-Type", "video/mp4")
                    self.send_header("Content-Length", str(len(owner.video)))
                    self.end_headers()
                    return self.wfile.write(owner.video)
                if self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location",
                                     "http://169.254.169.254/latest?X-Amz-Signature=secret123")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                prefix = "/v2/video/generations?generation_id="
                gid = self.path.removeprefix(prefix)
                if gid in owner.echoed:
                    return self._json(200, {"id": gid, "status": "error", "error": {
                        "name": "Unauthorized", "message": owner.echoed[gid]}})
                if not self.path.startswith(prefix) or gid not in owner.urls:
                    return self._json(404, {"message": "not found"})
                self._json(200, {"id": gid, "status": "completed",
                                 "video": {"url": owner.urls[gid]}})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hostile_upstream():
    server = HostileUpstream()
    yield server
    server.stop()


def test_hostile_result_urls_are_refused(make_sandbox, make_pipeline, hostile_upstream,
                                         tmp_path):
    """file:, gopher:, metadata, private, IPv4-mapped and a redirect to metadata: every
    job fails 'refused', nothing is stored, and no URL query token reaches the reason."""
    for case, url in HOSTILE_URLS.items():
        hostile_upstream.urls[f"g-{case}"] = url or f"{hostile_upstream.url}/redirect?sig=abc"
    pipeline = make_pipeline(make_sandbox(), AIMLAPI_BASE_URL=hostile_upstream.url,
                             AIMLAPI_KEY="k")
    pipeline.start_workers()
    prompts = [f"hostile case {case}" for case in HOSTILE_URLS]
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", prompts), "ssrf")

    counts = pipeline.wait_finished("ssrf", timeout_s=60)

    jobs = {job.generation_id.removeprefix("g-"): job for job in jobs_of(pipeline, "ssrf")}
    assert set(jobs) == set(HOSTILE_URLS), jobs
    assert counts["failed"] == len(HOSTILE_URLS) and counts["done"] == 0
    for case, job in jobs.items():
        reason = job.last_error
        assert job.state == "failed", (case, job.state, reason)
        assert "refused result url" in reason.lower(), (case, reason)
        assert "secret123" not in reason and "sig=abc" not in reason, (case, reason)
    assert "169.254.169.254" in jobs["redirect"].last_error
    assert media_under(tmp_path / "videos") == []
    # The worker went no further than the redirect on the allowed host.
    fetched = [path for method, path in hostile_upstream.requests if method == "GET"]
    assert all(p.startswith(("/v2/video/generations?", "/redirect")) for p in fetched), fetched
    assert sum(p.startswith("/redirect") for p in fetched) == 1


def test_a_redirect_loop_on_a_paid_result_is_tried_again_not_failed(
        make_sandbox, make_pipeline, hostile_upstream, tmp_path):
    """A CDN that redirects a result URL to itself past the hop limit, for a
    while: the paid job is not failed ("refused" is for URLs vidq must not
    fetch); its download is tried again and stores the video, whole."""
    clip = tmp_path / "clip.mp4"
    render_clip(clip, 64, 64)
    hostile_upstream.video = clip.read_bytes()
    hostile_upstream.loop_hops = 20  # more than three tries' worth of hops
    hostile_upstream.urls["g-looping"] = f"{hostile_upstream.url}/loop"
    pipeline = make_pipeline(make_sandbox(), AIMLAPI_BASE_URL=hostile_upstream.url,
                             AIMLAPI_KEY="k")
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["a cdn looping"]), "loop")

    assert pipeline.wait_finished("loop", timeout_s=60) == {
        **pipeline.store.counts("loop"), "done": 1}
    assert hostile_upstream.loop_hops == 0
    [stored] = [path for path in media_under(tmp_path / "videos") if path.suffix == ".mp4"]
    assert stored.read_bytes() == hostile_upstream.video


def test_video_over_size_cap_is_refused(make_sandbox, make_pipeline, tmp_path):
    """VIDQ_MAX_VIDEO_BYTES=1000: the download fails 'over the cap' and publishes nothing."""
    pipeline = make_pipeline(make_sandbox(), VIDQ_MAX_VIDEO_BYTES=1000)
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["a whale far too large"]), "big")

    counts = pipeline.wait_finished("big")

    assert counts["failed"] == 1
    (job,) = jobs_of(pipeline, "big")
    assert "1000 byte cap" in job.last_error, job.last_error
    assert job.generation_id  # paid for: kept
    assert media_under(tmp_path / "videos") == []


# -- c) names cannot escape their prefix ---------------------------------------------------


def vidq(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", *args],
                          env=env, capture_output=True, text=True, timeout=60)


def test_hostile_batch_names_and_job_ids_are_refused(redis_url, tmp_path):
    """'..', '../x', '.hidden', 'a/b', 'a:b' and a job id '../../etc/x': exit 2, a clear
    error, and no Redis key created."""
    env = {**os.environ, "VIDQ_REDIS_URL": redis_url}
    prompts = write_prompts(tmp_path / "p.txt", ["a harmless prompt"])
    bad_id = tmp_path / "bad.jsonl"
    bad_id.write_text('{"id": "../../etc/x", "prompt": "escape"}\n')
    client = redis.Redis.from_url(redis_url)
    before = sorted(client.scan_iter())

    for name in ("..", "../x", ".hidden", "a/b", "a:b"):
        result = vidq("enqueue", str(prompts), "--batch", name, env=env)
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: batch name"), (name, lines)
        assert "Traceback" not in result.stderr
    result = vidq("enqueue", str(bad_id), "--batch", "fine", env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr
    assert "line 1" in result.stderr and "../../etc/x" in result.stderr, result.stderr

    assert sorted(client.scan_iter()) == before


def test_a_gateway_password_in_the_base_url_stays_out_of_the_workers_shared_record():
    """The settings each worker records for its peers (and `vidq status` shows
    when they disagree) carry the upstream URL without userinfo or query."""
    from worker.deployment import record
    from worker.settings import Settings

    settings = Settings.from_env({"AIMLAPI_KEY": "sk-x", "AIMLAPI_BASE_URL":
                                  "http://gw:Zq7Se/cr3tPw@127.0.0.1:8000/v1?token=T0kenValue"})
    shared = record(settings)
    assert "Zq7Se" not in shared and "cr3tPw" not in shared and "T0kenValue" not in shared
    assert "http://127.0.0.1:8000/v1" in shared
