"""A Redis that answers before its disk has the write (appendfsync everysec,
or no AOF) and crashes within that second: a paid generation id it had
acknowledged is recorded again, by the POST thread or by the journal's
replay, so its video is still downloaded. A real Redis SIGKILLed and
restarted from its AOF as it was before the record; real workers; the
sandbox over HTTP."""
from __future__ import annotations

import hashlib
import shutil
import threading
import time
from pathlib import Path

import pytest
import redis
from chaos.faultproxy import FaultProxy
from conftest import wait_until, write_prompts
from test_paid_journal import _holding, _job
from test_steps import _admit_one, steps_for  # noqa: F401 - fixture

from producer.redis_server import PrivateRedis
from worker import keys, pipeline, posting, tasks
from worker.durability import Durability
from worker.jobs import JobStore
from worker.marker import mark_posting
from worker.paid_journal import deployment_id, replay

EVERYSEC = ("--appendfsync", "everysec")
FAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"  # Debian's faketime


@pytest.mark.slow
def test_a_redis_that_loses_the_recorded_id_in_a_crash_has_it_recorded_again(
        make_pipeline, make_sandbox, tmp_path):
    """appendfsync everysec: Redis answered the id's record, then crashed before
    its disk had it. It came back with the POST's marker and no id: the job
    failed "outcome unknown" and its paid video was never fetched (the journal
    was already emptied). The id is now recorded again once the same Redis
    has run past its fsync window, or on the Redis that replaced it."""
    server = PrivateRedis(tmp_path / "redis", extra_args=EVERYSEC).start()
    sandbox = make_sandbox()
    # Answered 3 s after the marker: time for a loaded test process to copy
    # the AOF before the id's record (the HTTP timeout and deadline allow it).
    proxy = FaultProxy(sandbox.url, seed=3, rewrite_urls=True, slow_s=3.0).start()
    try:
        pipeline = make_pipeline(sandbox, VIDQ_REDIS_URL=server.url, AIMLAPI_BASE_URL=proxy.url,
                                 VIDQ_MAX_IN_FLIGHT="1", VIDQ_HTTP_TIMEOUT_S="10",
                                 VIDQ_POST_DEADLINE_S="10", VIDQ_STEP_GRACE_S="30")
        proxy.queue("slow_headers", count=1, method="POST")
        pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["paid before the crash"]), "night")
        [job_id] = pipeline.store.job_ids("night")
        job_key = keys.job(f"night:{job_id}")
        pipeline.start_workers()
        client = redis.Redis.from_url(server.url)
        wait_until(lambda: client.hget(job_key, "posting_at"), 30, "the POST's marker", 0.01)
        aof = tmp_path / "redis" / "appendonly.aof"
        shutil.copy(aof, tmp_path / "before-the-answer.aof")
        wait_until(lambda: client.hget(job_key, "generation_id"), 30, "the id recorded", 0.01)
        server.process.kill()  # a crash before everysec's fsync: the id's record is lost
        server.process.wait()
        shutil.copy(tmp_path / "before-the-answer.aof", aof)
        server = PrivateRedis(tmp_path / "redis", port=server.port, extra_args=EVERYSEC).start()
        client = redis.Redis.from_url(server.url)
        assert client.hget(job_key, "generation_id") is None and client.hget(job_key, "posting_at")

        assert pipeline.wait_finished("night", timeout_s=60)["done"] == 1
        [entry] = pipeline.ledger()
        video = (tmp_path / "videos" / "night" / f"{job_id}.mp4").read_bytes()
        assert hashlib.sha256(video).hexdigest() == entry["sha256"]
        log = (pipeline.log_dir / "worker-0.log").read_text()
        # Restarted by the time of the check ("Redis restarted before generation
        # ..."), or still away ("not confirmed on disk yet"): recorded again.
        assert "recording it again" in log
        pipeline.stop_workers()
    finally:
        proxy.stop()
        server.stop()


def test_a_replayed_id_that_an_everysec_redis_loses_in_a_crash_is_replayed_again(tmp_path):
    """appendfsync everysec: a dead process's pending id was recorded from its
    journal, the file deleted, and Redis crashed before its disk had the
    record: the paid video was lost. The file now stays until the same Redis
    still runs a few seconds later; else the next pass records it again."""
    server = PrivateRedis(tmp_path / "redis", extra_args=EVERYSEC).start()
    try:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        _job(client, "1")
        directory = tmp_path / "journal"
        holder = _holding(directory, deployment_id(client), "1", "gen-a")
        holder.kill()
        holder.wait()
        aof = tmp_path / "redis" / "appendonly.aof"
        shutil.copy(aof, tmp_path / "before-the-replay.aof")
        durability = Durability.probe(client)
        replayed: list[object] = []
        first = threading.Thread(target=lambda: replayed.append(_replay_or_error(
            directory, JobStore(client), durability)))
        first.start()
        wait_until(lambda: client.hget(keys.job("night:1"), "generation_id"), 10, "the record",
                   0.01)
        server.process.kill()  # a crash before everysec's fsync: the record is lost
        server.process.wait()
        shutil.copy(tmp_path / "before-the-replay.aof", aof)
        server = PrivateRedis(tmp_path / "redis", port=server.port, extra_args=EVERYSEC).start()
        first.join(30)
        assert replayed != [1] and not client.hget(keys.job("night:1"), "generation_id")

        assert replay(directory, JobStore(client), 0.0, Durability.probe(client)) == 1
        assert client.hget(keys.job("night:1"), "generation_id") == "gen-a"
        assert not list(directory.glob("*.jsonl"))
    finally:
        server.stop()


def _replay_or_error(directory: Path, store: JobStore, durability: Durability) -> object:
    try:
        return replay(directory, store, 0.0, durability)
    except redis.RedisError as exc:  # Redis still away at the check: the file is kept too
        return exc


@pytest.mark.parametrize("crash", ["as the marker was written", "as the answer came"])
def test_a_submit_sent_again_after_a_crash_mid_post_waits_for_the_id(
        steps_for, make_sandbox, tmp_path, monkeypatch, crash):  # noqa: F811
    """Reviews 99 and 100: a Redis crash mid-POST restored the marker with no
    id (and no entry on the wire, which ended as the answer came, or did not
    exist yet). The step's retry failed the job "outcome unknown", and the
    POST thread revived it 3 s later (the batch reopened). While the POST's
    worker beats, the submit sent again now waits for the id."""
    server = PrivateRedis(tmp_path / "redis", extra_args=EVERYSEC).start()
    sandbox = make_sandbox()
    try:
        steps = steps_for(sandbox, VIDQ_REDIS_URL=server.url)
        client = steps.store.redis
        sender = keys.worker_alive(steps.worker_name)
        ref, job, server = _submit_then_crash(steps, server, crash, tmp_path, monkeypatch)
        client.set(sender, keys.STEPS_WORKER)
        assert client.hget(keys.job(ref), "posting_at")
        assert not client.hget(keys.job(ref), "generation_id")

        steps.retry(job, RuntimeError("ConnectionError: Connection closed by server."))
        step, _, token = steps.sent[-1]
        tasks._run(steps, step, steps.claim(ref, token, step))
        assert steps.store.get(ref).state == "queued"  # not failed: looks again in 5 s
        steps.looked.set()
        wait_until(lambda: client.hget(keys.job(ref), "generation_id"), 30, "the id again")
        step, _, token = steps.sent[-1]
        tasks._run(steps, step, steps.claim(ref, token, step))
        assert steps.sent[-1][0] == "poll" and steps.store.get(ref).state == "submitted"
        assert client.hget(keys.batch("b"), "reopened") is None
        assert sandbox.stats()["submissions"] == 1
    finally:
        server.stop()


def test_a_redis_younger_than_a_heartbeat_has_not_heard_the_sender_yet(
        steps_for, make_sandbox, tmp_path, monkeypatch):  # noqa: F811
    """CI, 1 run in 8: Redis restored from its disk at the marker came back
    without the sender's beat (expired while it was down), and the submit's
    retry 0.1 s later, before the sender beat again, failed the job "outcome
    unknown" while the POST thread recorded its id. Until a Redis has run for
    a heartbeat's lifetime, a missing beat proves nothing."""
    server = PrivateRedis(tmp_path / "redis", extra_args=EVERYSEC).start()
    sandbox = make_sandbox()
    try:
        steps = steps_for(sandbox, VIDQ_REDIS_URL=server.url)
        client = steps.store.redis
        ref, job, server = _submit_then_crash(steps, server, "as the marker was written",
                                              tmp_path, monkeypatch)
        client.delete(keys.worker_alive(steps.worker_name))  # it expired while Redis was down

        steps.retry(job, RuntimeError("ConnectionError: Connection closed by server."))
        step, _, token = steps.sent[-1]
        tasks._run(steps, step, steps.claim(ref, token, step))
        assert steps.store.get(ref).state == "queued", steps.store.get(ref).last_error
        steps.looked.set()
        wait_until(lambda: client.hget(keys.job(ref), "generation_id"), 30, "the id again")
        assert sandbox.stats()["submissions"] == 1
    finally:
        server.stop()


def test_a_redis_whose_clock_stepped_back_is_not_young(
        steps_for, make_sandbox, tmp_path, monkeypatch):  # noqa: F811
    """Review 129: Redis's uptime follows its wall clock. Stepped back 40 s (an
    NTP step, a VM restored), it read -39 s and was taken for a Redis just
    started: a dead sender's job waited ~40 s past its 4 s deadline, its slot
    held. It now ends "outcome unknown" at once, nothing POSTed."""
    clock = tmp_path / "redis-clock"
    clock.write_text("+0\n")
    with monkeypatch.context() as faked:
        for name, value in (("LD_PRELOAD", FAKETIME), ("FAKETIME_TIMESTAMP_FILE", str(clock)),
                            ("FAKETIME_NO_CACHE", "1"), ("DONT_FAKE_MONOTONIC", "1")):
            faked.setenv(name, value)
        server = PrivateRedis(tmp_path / "redis").start()
    try:
        sandbox = make_sandbox()
        steps = steps_for(sandbox, VIDQ_REDIS_URL=server.url, VIDQ_POST_DEADLINE_S="4",
                          VIDQ_HEARTBEAT_INTERVAL_S="0.3")  # old enough after 1 s
        client = steps.store.redis
        wait_until(lambda: client.info("server")["uptime_in_seconds"] >= 1, 5, "1 s up")
        ref, token = _admit_one(steps)
        job = steps.claim(ref, token, "submit")
        assert mark_posting(steps.store, job, steps.durability) == "ok"
        steps.retry(job, RuntimeError("WorkerLostError: the worker died mid-POST"))
        clock.write_text("-40\n")
        wait_until(lambda: client.info("server")["uptime_in_seconds"] < 0, 5, "the step back")

        step, _, token = steps.sent[-1]
        tasks._run(steps, step, steps.claim(ref, token, step))
        failed = steps.store.get(ref)
        assert failed.state == "failed" and "outcome_unknown" in failed.last_error
        assert sandbox.stats()["submissions"] == 0
    finally:
        server.stop()


def _submit_then_crash(steps, server: PrivateRedis, crash: str, tmp_path: Path,
                       monkeypatch) -> tuple[str, object, PrivateRedis]:
    """A job's submit, its sender beating, then Redis crashed and restarted from
    its AOF as it was at `crash`; returns (ref, the claimed job, the new server).
    The POST thread records the id again only once the test sets `steps.looked`
    (after its retry looked at the job): a loaded machine's retry came after it."""
    aof = tmp_path / "redis" / "appendonly.aof"
    steps.looked = threading.Event()
    settled = posting.same_run_after

    def after_the_look(client, run):
        steps.looked.wait(30)
        return settled(client, run)

    monkeypatch.setattr(posting, "same_run_after", after_the_look)
    steps.store.redis.set(keys.worker_alive(steps.worker_name), keys.STEPS_WORKER)
    ref, token = _admit_one(steps)
    _snapshot_at(crash, aof, tmp_path / "at-the-crash.aof", monkeypatch)
    job = steps.claim(ref, token, "submit")
    tasks._run(steps, "submit", job)
    server.process.kill()  # the record and the step's next write are lost
    server.process.wait()
    shutil.copy(tmp_path / "at-the-crash.aof", aof)
    return ref, job, PrivateRedis(tmp_path / "redis", port=server.port,
                                  extra_args=EVERYSEC).start()


def _snapshot_at(crash: str, aof: Path, copy: Path, monkeypatch) -> None:
    """Copy Redis's AOF at the crash point (it then holds what a crash there keeps)."""
    if crash == "as the marker was written":
        marked = pipeline.mark_posting

        def snapshot(*args, **kwargs):
            answer = marked(*args, **kwargs)
            shutil.copy(aof, copy)
            return answer

        monkeypatch.setattr(pipeline, "mark_posting", snapshot)
    else:
        journal_paid = posting._journal_paid

        def snapshot(journal, job, generation_id):  # type: ignore[misc]
            shutil.copy(aof, copy)
            return journal_paid(journal, job, generation_id)

        monkeypatch.setattr(posting, "_journal_paid", snapshot)


@pytest.mark.slow
def test_a_job_whose_last_writes_redis_lost_is_polled_again_at_once(make_pipeline, make_sandbox,
                                                                     tmp_path):
    """appendfsync everysec, a crash inside its second: the job's record comes
    back with the token of a poll that already ran, while its worker holds
    the countdown of the next. That message was dropped as stale, and the
    job waited a step grace (90 s by default; 600 here) with its slot idle
    for the reconciler (review 113). A claim that finds a record older than
    its message now makes the job due at once. (The worker's heartbeat outlives
    the restart here, so the reconciler takes it as holding the first poll.)"""
    server = PrivateRedis(tmp_path / "redis", extra_args=EVERYSEC).start()
    aof = tmp_path / "redis" / "appendonly.aof"
    try:
        pipeline = make_pipeline(make_sandbox(time_scale=4.5),  # ~20 s generations
                                 VIDQ_REDIS_URL=server.url, VIDQ_MAX_IN_FLIGHT="1",
                                 VIDQ_STEP_GRACE_S="600", VIDQ_EXPECTED_GENERATION_S="20",
                                 VIDQ_HEARTBEAT_INTERVAL_S="5")
        pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["rolled back"]), "night")
        [job_id] = pipeline.store.job_ids("night")
        job_key = keys.job(f"night:{job_id}")
        pipeline.start_workers()
        client = redis.Redis.from_url(server.url, decode_responses=True)

        def pending_poll() -> str | None:
            token, step, holder = client.hmget(job_key, "token", "step", "holder")
            return token if step == "poll" and token and token.isdigit() and holder else None

        first = wait_until(pending_poll, 30, "the first poll's countdown, held", 0.01)
        shutil.copy(aof, tmp_path / "first-poll.aof")  # what the disk has...
        wait_until(lambda: pending_poll() not in (None, first), 30, "the next poll", 0.01)
        # The first poll's message acked: restored from the worker's memory on
        # reconnecting, it would run at once and hide the stale one.
        time.sleep(0.5)
        server.process.kill()  # ...when the crash comes a poll later
        server.process.wait()
        shutil.copy(tmp_path / "first-poll.aof", aof)
        server = PrivateRedis(tmp_path / "redis", port=server.port, extra_args=EVERYSEC).start()
        assert client.hget(job_key, "token") == first

        assert pipeline.wait_finished("night", timeout_s=90)["done"] == 1
        [entry] = pipeline.ledger()
        video = (tmp_path / "videos" / "night" / f"{job_id}.mp4").read_bytes()
        assert hashlib.sha256(video).hexdigest() == entry["sha256"]
        assert "Redis lost its last writes" in (pipeline.log_dir / "worker-0.log").read_text()
        pipeline.stop_workers()
    finally:
        server.stop()
