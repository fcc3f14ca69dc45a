"""A download whose worker stops or stands still mid-stream, while another
worker runs (review 102). Real Redis, real worker processes, the sandbox
over HTTP behind a proxy that makes the first fetch of a video slow."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

from chaos.faultproxy import FaultProxy
from conftest import wait_until, write_prompts
from s3faults import S3FaultProxy
from test_s3 import aws_env, bucket, s3, s3_endpoint  # noqa: F401 - fixtures

from bench import infra
from producer.batch_view import workers_alive
from worker import keys

FAST_BPS = 1_000_000


class ChangingProxy(FaultProxy):
    """Every fetch of a video after the first has its last byte (inside the
    sandbox's padding box: still a valid MP4) flipped: a CDN serving a
    re-muxed object. Two fetches then store two different sha256s."""
    file_gets = 0
    change = False

    def _forward(self, request: bytes) -> bytes:
        answer = super()._forward(request)
        if request.startswith(b"GET /files/"):
            with self._lock:
                self.file_gets += 1
                if self.change and self.file_gets >= 2:
                    answer = answer[:-1] + bytes([answer[-1] ^ 0xFF])
        return answer


def _one_slow_download(make_pipeline, make_sandbox, tmp_path, batch: str, sandbox=None,
                       **env):
    """Worker A streams the batch's one video slowly."""
    sandbox_server = make_sandbox(**(sandbox or {}))
    proxy = ChangingProxy(sandbox_server.url, seed=1, rewrite_urls=True).start()
    # The production lease: renewed (and found lost) every 300 s, not during the stream.
    pipeline = make_pipeline(sandbox_server, AIMLAPI_BASE_URL=proxy.url,
                             VIDQ_DOWNLOAD_GRACE_S="900", VIDQ_VISIBILITY_TIMEOUT_S="1800",
                             **env)
    # The sandbox's 0.8 MB video in ~80 s, so that the test's steps (starting
    # worker B, a SIGTERM) surely come mid-stream on a loaded machine; tests
    # speed it up (`proxy.throttle_bps = FAST_BPS`) once they have.
    proxy.throttle_bps = 10_000
    proxy.queue("throttle", count=1, method="GET", path_prefix="/files/")
    pipeline.start_workers(1, concurrency=2)
    pipeline.enqueue(write_prompts(tmp_path / f"{batch}.txt", [f"{batch} fox"]), batch)
    (job_id,) = pipeline.store.job_ids(batch)
    wait_until(lambda: proxy.counts.get("throttle") == 1, 60, "A's download started", 0.05)
    return pipeline, proxy, keys.job_ref(batch, job_id), tmp_path / "videos" / batch / f"{job_id}.mp4"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stored_once(pipeline, ref: str, video: Path) -> None:
    job = pipeline.store.get(ref)
    card = json.loads(video.with_suffix(".json").read_text())
    assert job.state == "done"
    assert job.extra["sha256"] == _sha(video) == card["sha256"]


def test_a_warm_shutdown_mid_download_finishes_it_once(make_pipeline, make_sandbox, tmp_path):
    """SIGTERM (a deploy) while A streams a video: its heartbeat went as the
    shutdown began, so B's reconciler could send the download again and
    store it; A, finishing, stored it again over B's after the job was done.
    A's heartbeat now says "stopping" until it exits: the step its pool runs
    stays its."""
    pipeline, proxy, ref, video = _one_slow_download(make_pipeline, make_sandbox, tmp_path,
                                                     "deploy")
    a = pipeline.processes[0]
    client = pipeline.store.redis
    (name_a,) = client.zrange(keys.WORKERS, 0, -1)
    try:
        pipeline.start_workers(1, concurrency=2)
        time.sleep(1)  # B's reconciler at work
        a.send_signal(signal.SIGTERM)
        wait_until(lambda: client.get(keys.worker_alive(name_a)) == keys.STOPPING_WORKER, 10,
                   "A's heartbeat to say it is stopping", 0.05)
        # `vidq status` counts B alone: A will take no new step.
        assert workers_alive(client) == 1 and pipeline.store.get(ref).state == "downloading"
        proxy.throttle_bps = FAST_BPS
        a.wait(60)
        assert pipeline.wait_finished("deploy", timeout_s=30)["done"] == 1
        time.sleep(2)  # B's reconciler passes once more

        assert proxy.file_gets == 1
        (generation,) = pipeline.ledger()
        assert generation["sha256"] == _sha(video)
        _stored_once(pipeline, ref, video)
        assert "taken over" not in (pipeline.log_dir / "worker-0.log").read_text()
    finally:
        proxy.stop()


def test_a_stopping_worker_hands_the_polls_it_holds_on_at_once(make_pipeline, make_sandbox,
                                                               tmp_path):
    """The same deploy, A also holding another job's countdown poll: that
    poll will not run in a stopping worker, so it is sent again at once, not
    when A's download ends and A exits (nor a step grace past its due time,
    when the reconciler takes a poll not run for lost).

    A is stopped the moment it holds that poll, before it is due, and B is
    started after: that job is polled about once a second, and with B up
    first, B could hold the current poll when A was stopped, or A could be
    running it, leaving nothing to hand on (failed 2 of 3 clean-clone CI
    runs). Its generation is ~30 s, so it is still generating then."""
    sandbox = make_sandbox(time_scale=9)  # the deploy's video: ~10 s
    pipeline, proxy, ref, _video = _one_slow_download(
        make_pipeline, lambda **_: sandbox, tmp_path, "deploy", VIDQ_STEP_GRACE_S="60")
    a = pipeline.processes[0]
    infra.set_mean_generation_s(sandbox, 270)  # ~30 s from here on
    pipeline.enqueue(write_prompts(tmp_path / "more.txt", ["a poll held"]), "more")
    (other,) = [keys.job_ref("more", i) for i in pipeline.store.job_ids("more")]
    client = pipeline.store.redis

    def held_by_a_for_a_while() -> bool:
        job = pipeline.store.get(other)
        # Its score: the countdown's due time plus the step grace (60 s).
        started_by = client.zscore(keys.DUE, other)
        return (job.state == "generating" and not job.token.startswith("run:")
                and bool(client.hget(keys.job(other), "holder"))
                and started_by is not None and started_by - 60 > pipeline.store.now() + 0.3)

    try:
        wait_until(held_by_a_for_a_while, 60, "A holding the other job's countdown poll", 0.05)
        a.send_signal(signal.SIGTERM)
        pipeline.start_workers(1, concurrency=2)
        logs = [pipeline.log_dir / f"worker-{n}.log" for n in (0, 1)]  # either reconciles
        # After B's boot, within a heartbeat and a reconciler pass: far from
        # A's download's end (~80 s at 10 kB/s) and the 60 s step grace.
        wait_until(lambda: any(f"re-sending poll for job {other}" in log.read_text()
                               for log in logs), 20, "the held poll sent again", 0.05)
        assert pipeline.store.get(ref).state == "downloading", "the held poll waited for A"
        proxy.throttle_bps = FAST_BPS
        assert pipeline.wait_finished("more", timeout_s=90)["done"] == 1
        a.wait(60)
        assert pipeline.wait_finished("deploy", timeout_s=30)["done"] == 1
    finally:
        proxy.stop()


def test_a_writer_killed_mid_video_leaves_no_part_file_once_the_video_lands(
        make_pipeline, make_sandbox, tmp_path):
    """A is SIGKILLed with half a video in its temporary file; B takes the
    download over and stores it. A's `.part` stayed for good (only one over
    an hour old was removed, and only by a later write of the same key):
    each kill could leave up to a video's bytes on a disk that may be full
    (helper 109). Publishing a video now removes its name's other parts."""
    pipeline, proxy, ref, video = _one_slow_download(make_pipeline, make_sandbox, tmp_path,
                                                     "killed")
    try:
        wait_until(lambda: any(p.stat().st_size for p in _parts(video)), 60,
                   "A's part file", 0.05)
        os.killpg(pipeline.processes[0].pid, signal.SIGKILL)
        pipeline.start_workers(1, concurrency=2)
        wait_until(lambda: pipeline.store.get(ref).state == "done", 90, "done by B", 0.1)

        _stored_once(pipeline, ref, video)
        assert _parts(video) == []
    finally:
        proxy.stop()


def _parts(video: Path) -> list[Path]:
    return sorted(video.parent.glob(f".{video.name}.*.part"))


def test_a_copy_taken_over_mid_download_never_publishes(make_pipeline, make_sandbox, tmp_path):
    """A stands still (SIGSTOP: a paused VM) mid-stream past its heartbeat;
    B takes the download over, stores the video and ends the job. A, woken,
    finished its copy and published it over B's: a file and sidecar whose
    sha256 was not the one in Redis, the event and the manifest. Now the
    step checks it still owns the job right before publishing."""
    pipeline, proxy, ref, video = _one_slow_download(make_pipeline, make_sandbox, tmp_path,
                                                     "frozen")
    proxy.change = True
    a = pipeline.processes[0]
    pipeline.start_workers(1, concurrency=2)
    try:
        os.killpg(a.pid, signal.SIGSTOP)
        wait_until(lambda: pipeline.store.get(ref).state == "done", 60, "done by B", 0.1)
        stored_by_b = (video.stat().st_ino, _sha(video))
        proxy.throttle_bps = FAST_BPS
        os.killpg(a.pid, signal.SIGCONT)
        log_a = pipeline.log_dir / "worker-0.log"
        wait_until(lambda: "taken over by a newer step" in log_a.read_text(), 60,
                   "A's copy to end", 0.2)

        assert proxy.file_gets == 2  # A's copy did run to its end
        assert (video.stat().st_ino, _sha(video)) == stored_by_b
        _stored_once(pipeline, ref, video)
    finally:
        os.killpg(a.pid, signal.SIGCONT)
        proxy.stop()


def test_a_copy_taken_over_while_its_s3_put_is_retried_never_publishes(
        make_pipeline, make_sandbox, s3, bucket, s3_endpoint, tmp_path):  # noqa: F811
    """On S3 the check came before the PUT, and botocore retried a PUT
    answered 503 after its backoff: A frozen in that backoff, taken over, put
    its copy over B's when it woke (review 103). Each try of the publishing
    request is now checked first."""
    sandbox = make_sandbox()
    upstream = ChangingProxy(sandbox.url, seed=1, rewrite_urls=True).start()
    upstream.change = True
    storage = S3FaultProxy(s3_endpoint)
    pipeline = make_pipeline(sandbox, AIMLAPI_BASE_URL=upstream.url, AWS_ENDPOINT_URL=storage.url,
                             VIDQ_STORAGE_URL=f"s3://{bucket}/pfx")
    frozen: list[float] = []

    def freeze_a(request) -> bool:
        if frozen or request.method != "PUT" or not request.path.endswith(".mp4"):
            return False
        os.killpg(pipeline.processes[0].pid, signal.SIGSTOP)  # a paused VM, its PUT answered 503
        frozen.append(time.monotonic())
        return True

    storage.fail(freeze_a, status=503, count=1)
    pipeline.start_workers(1, concurrency=2)
    a = pipeline.processes[0]
    pipeline.enqueue(write_prompts(tmp_path / "night.txt", ["an s3 fox"]), "night")
    (job_id,) = pipeline.store.job_ids("night")
    ref, key = keys.job_ref("night", job_id), f"pfx/night/{job_id}.mp4"
    try:
        wait_until(lambda: bool(frozen), 60, "A's PUT answered 503, A frozen", 0.05)
        pipeline.start_workers(1, concurrency=2)
        wait_until(lambda: pipeline.store.get(ref).state == "done", 60, "done by B", 0.1)
        os.killpg(a.pid, signal.SIGCONT)
        wait_until(lambda: "taken over by a newer step" in (
            pipeline.log_dir / "worker-0.log").read_text(), 60, "A's copy to end", 0.2)

        stored = hashlib.sha256(s3.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest()
        card = json.loads(s3.get_object(Bucket=bucket, Key=key.replace(".mp4", ".json"))["Body"]
                          .read())
        assert stored == card["sha256"] == pipeline.store.get(ref).extra["sha256"]
        assert s3.head_object(Bucket=bucket, Key=key)["Metadata"]["sha256"] == stored
    finally:
        os.killpg(a.pid, signal.SIGCONT)
        upstream.stop()
        storage.stop()
