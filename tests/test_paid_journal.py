"""A paid generation id held only by a worker that is stopped while Redis is
away (worker/paid_journal.py): the next worker sharing its journal records it,
so the video is downloaded and the job never ends "outcome unknown". Real
Redis, real worker processes killed with SIGKILL, the sandbox over HTTP."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from chaos.redis_lost_reply import LostReplyProxy
from conftest import wait_until, write_prompts
from test_lost_replies import _run_of
from test_steps import _admit_one, steps_for  # noqa: F401 - fixture

from producer.batch_view import workers_alive
from worker import keys, tasks
from worker.jobs import JobStore, load_script
from worker.marker import mark_posting
from worker.paid_journal import _abandoned, deployment_id, replay
from worker.upstream import UpstreamClient

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from worker.jobs import Job
    from worker.paid_journal import PaidJournal
    journal = PaidJournal(Path(sys.argv[1]))
    job = Job(batch="night", id=sys.argv[3], request={}, state="",
              extra={"posting_op": "op1", "deployment": sys.argv[2]})
    journal.paid(job, sys.argv[4])
    print("journaled", flush=True)
    time.sleep(600)
""")


def _holding(directory: Path, deployment: str, job_id: str, generation_id: str):
    """A process that journaled a paid id and holds it (Redis never told)."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), deployment,
                                job_id, generation_id], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "journaled\n"
    return process


def _job(client: redis.Redis, job_id: str, **fields) -> None:
    client.hset(keys.job(f"night:{job_id}"), mapping={
        "batch": "night", "id": job_id, "request": "{}", "state": "submitting", **fields})
    client.sadd(keys.batch_jobs("night"), job_id)


def test_a_dead_processs_paid_ids_are_recorded_and_a_live_ones_left(redis_url, tmp_path):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = JobStore(client)
    deployment = deployment_id(client)
    _job(client, "1")
    _job(client, "2", state="failed", outcome_unknown="1")
    client.hset(keys.batch_counts("night"), mapping={"submitting": 1, "failed": 1})
    directory = tmp_path / "journal"
    dead = [_holding(directory, deployment, "1", "gen-a"),
            _holding(directory, deployment, "2", "gen-b")]
    alive = _holding(directory, deployment, "3", "gen-c")
    for process in dead:
        process.kill()
        process.wait()
    try:
        assert replay(directory, store, 0.0, None) == 2
        (kept,) = directory.iterdir()  # the dead ones' files are gone
        assert "gen-c" in kept.read_text()
        assert replay(directory, store, 0.0, None) == 0  # the live one's stays
    finally:
        alive.kill()
        alive.wait()
    first, second = client.hgetall(keys.job("night:1")), client.hgetall(keys.job("night:2"))
    assert (first["generation_id"], first["state"]) == ("gen-a", "submitted")
    # Failed "outcome unknown" meanwhile (its marker found, no id): revived.
    assert (second["generation_id"], second["state"], second["outcome_unknown"]) == \
        ("gen-b", "submitted", "")


def test_another_redis_s_ids_are_kept_and_a_torn_line_skipped(redis_url, tmp_path, caplog):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = JobStore(client)
    directory = tmp_path / "journal"
    other = _holding(directory, "another-deployment", "1", "gen-x")
    other.kill()
    other.wait()
    (path,) = directory.iterdir()
    with path.open("a") as handle:
        handle.write('{"paid": "gen-y", "ba')  # a process killed mid-write
    _job(client, "1")

    assert replay(directory, store, 0.0, None) == 0
    assert path.exists() and "another Redis" in caplog.text and ":2: unreadable" in caplog.text
    assert not client.hget(keys.job("night:1"), "generation_id")
    client.hset(keys.CONFIG, "deployment_id", "another-deployment")  # that Redis's worker
    assert replay(directory, store, 0.0, None) == 1
    assert client.hget(keys.job("night:1"), "generation_id") == "gen-x"
    assert not path.exists()


def test_a_file_with_another_rediss_ids_has_this_ones_recorded_once(redis_url, tmp_path,
                                                                      caplog):
    """A process died with ids of this Redis and of one flushed since pending:
    this Redis's are recorded once (not again every pass, reviving a purged
    job's orphan record each time); the others are kept, logged once."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = JobStore(client)
    directory = tmp_path / "journal"
    for holder in (_holding(directory, "before-the-flush", "1", "gen-old"),
                   _holding(directory, deployment_id(client), "2", "gen-new")):
        holder.kill()
        holder.wait()
    paths = sorted(directory.iterdir())
    (directory / "z-unreadable.jsonl").write_bytes(b"\xff\xfe not utf-8 {\n")
    (directory / "a-directory.jsonl").mkdir()
    _job(client, "1")
    _job(client, "2")

    assert replay(directory, store, 0.0, None) == 1
    assert replay(directory, store, 0.0, None) == 0
    assert client.hget(keys.job("night:2"), "generation_id") == "gen-new"
    assert not client.hget(keys.job("night:1"), "generation_id")
    assert caplog.text.count("journaled for another Redis (deployment id before-the-flush") == 1
    assert "a-directory.jsonl: paid-id journal file not read" in caplog.text
    assert [p.exists() for p in paths].count(True) == 1  # the other Redis's file is kept


def test_a_stalled_journal_disk_never_keeps_the_id_from_redis(steps_for,  # noqa: F811
                                                              make_sandbox, monkeypatch):
    """The journal's fsync hangs (a network block volume stalled): Redis gets
    the id anyway, within the POST's deadline, and the job is polled."""
    steps = steps_for(make_sandbox(), VIDQ_POST_DEADLINE_S="3")
    monkeypatch.setattr(steps.journal, "paid", lambda job, generation_id: time.sleep(6))
    ref, token = _admit_one(steps)
    tasks._run(steps, "submit", steps.claim(ref, token, "submit"))
    record = steps.store.get(ref)
    assert record.generation_id and record.state == "submitted", record.last_error


def test_each_marker_names_the_redis_it_went_to(steps_for, make_sandbox):  # noqa: F811
    """Read with the marker, never cached: a Redis flushed under a running
    worker is known by a new id, and the old one's entries stay out of it."""
    steps = steps_for(make_sandbox())
    client = steps.store.redis
    ref, token = _admit_one(steps, job_id="j1")
    job = steps.claim(ref, token, "submit")
    assert mark_posting(steps.store, job, steps.durability) == "ok"
    assert job.extra["deployment"] == deployment_id(client)
    client.hset(keys.CONFIG, "deployment_id", "after-a-flush")
    ref, token = _admit_one(steps, job_id="j2")
    job = steps.claim(ref, token, "submit")
    assert mark_posting(steps.store, job, steps.durability) == "ok"
    assert job.extra["deployment"] == "after-a-flush"


def test_a_child_forked_during_a_replay_leaves_the_dead_file_unlocked(tmp_path):
    """A pool child replaced while the main process replays a dead file must
    not share its lock: the file would look alive as long as the child lives."""
    path = tmp_path / "dead.jsonl"
    path.write_text("")
    with _abandoned(path) as handle:
        assert handle is not None
        child = os.fork()
        if child == 0:
            time.sleep(30)
            os._exit(0)
    def unlocked() -> bool:
        with _abandoned(path) as again:
            return again is not None

    try:
        wait_until(unlocked, 5, "the dead file unlocked", 0.05)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def _redis_away_from_the_post(make_pipeline, make_sandbox, redis_url, **env):
    """A pipeline (C = 1) whose Redis, behind a proxy, goes away right as a
    POST is sent (after its open-POST note), until the test brings it back."""
    url = urlsplit(redis_url)
    proxy = LostReplyProxy(url.hostname, url.port)
    pipeline = make_pipeline(make_sandbox(), VIDQ_MAX_IN_FLIGHT=1,
                             VIDQ_REDIS_URL=f"redis://127.0.0.1:{proxy.port}{url.path}", **env)
    open_post = load_script(pipeline.store.redis, "open_post")
    proxy.after_reply(_run_of(open_post), then=lambda: proxy.down_for(600))
    return pipeline, proxy


@pytest.mark.slow
def test_a_worker_killed_holding_a_paid_id_while_redis_is_away_loses_no_video(
        make_pipeline, make_sandbox, redis_url, tmp_path):
    """Redis goes away right as the POST is sent (after its open-POST note):
    the upstream creates the generation and answers, the worker cannot record
    the id, and it is killed. A new worker, Redis back, records it from the
    journal: the video is stored, paid for once (it ended "outcome unknown",
    not downloaded)."""
    pipeline, proxy = _redis_away_from_the_post(make_pipeline, make_sandbox, redis_url)
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "night.txt", ["a paid fox"]), "night")
    wait_until(lambda: pipeline.ledger(), 30, "the generation created")
    log = tmp_path / "logs" / "worker-0.log"
    wait_until(lambda: "not recorded yet" in log.read_text(), 10, "the id held, Redis away")
    os.killpg(pipeline.processes[0].pid, signal.SIGKILL)
    pipeline.processes[0].wait()
    proxy.down_for(0)

    pipeline.start_workers()
    counts = pipeline.wait_finished("night", timeout_s=60)

    assert counts["done"] == 1, counts
    (paid,) = pipeline.ledger()
    (video,) = (tmp_path / "videos" / "night").glob("*.mp4")
    assert hashlib.sha256(video.read_bytes()).hexdigest() == paid["sha256"]
    assert not list((tmp_path / "journal").iterdir())



@pytest.mark.slow
def test_a_starting_worker_records_journaled_ids_before_it_beats(make_pipeline, tmp_path):
    """`vidq run`, resuming, watches the batch once a worker beats: a job
    failed "outcome unknown" whose paid id waits in the journal must be
    revived by then, or the rerun reports it lost and stops its workers."""
    pipeline = make_pipeline()
    client = pipeline.store.redis
    _job(client, "1", state="failed", outcome_unknown="1")
    client.hset(keys.batch_counts("night"), "failed", 1)
    holder = _holding(tmp_path / "journal", deployment_id(client), "1", "gen-a")
    holder.kill()
    holder.wait()
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", "vidq.poll",
         "--without-mingle", "--without-gossip"], env=pipeline.env,
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    pipeline.processes.append(process)
    state = wait_until(lambda: workers_alive(client) and client.hget(
        keys.job("night:1"), "state"), 60, "the first heartbeat", 0.01)
    assert state == "submitted"


def test_an_id_recorded_into_a_job_whose_admission_redis_lost_is_downloaded(make_pipeline,
                                                                          tmp_path):
    """Redis restarted from an older AOF (or lost everysec's last second) while
    a POST was out: the job is back to queued, never admitted, no token. Its
    POST thread then records the answer's id. The job became 'submitted' with
    no token, so the reconciler's compare-and-set on '' failed every pass,
    silently: the paid video was never fetched and it held a slot for good."""
    pipeline = make_pipeline(VIDQ_MAX_IN_FLIGHT="1")
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["admitted, then forgotten"]), "night")
    [job_id] = pipeline.store.job_ids("night")
    job = pipeline.store.get(f"night:{job_id}")
    assert pipeline.store.redis.hget(keys.job(job.ref), "token") is None  # never admitted
    paid = UpstreamClient(pipeline.settings).submit(job.request)
    pipeline.store.record_generation(job, paid.id, lease_s=30)

    pipeline.start_workers()
    assert pipeline.wait_finished("night", timeout_s=40)["done"] == 1
    [entry] = pipeline.ledger()
    row = pipeline.store.get(f"night:{job_id}")
    assert row.extra["generation_id"] == paid.id == entry["id"]
    video = (tmp_path / "videos" / "night" / f"{job_id}.mp4").read_bytes()
    assert hashlib.sha256(video).hexdigest() == entry["sha256"]
    pipeline.stop_workers()


@pytest.mark.slow
def test_a_pool_child_killed_before_redis_took_its_paid_id_leaves_its_job_alive(
        make_pipeline, make_sandbox, redis_url, tmp_path):
    """Redis goes away as the POST is sent; the pool child journals the
    answer and waits to record it. Redis comes back and, before the child's
    next try, the OOM killer takes it. Its worker marked the step lost (no
    POST on the wire any more), so the submit re-sent found the marker and no
    id and failed the job "outcome unknown", until the journal's next replay
    revived it. The worker now replays the dead child's journal first: the
    job never fails, and its video is downloaded, paid for once."""
    import psutil

    pipeline, proxy = _redis_away_from_the_post(make_pipeline, make_sandbox, redis_url)
    pipeline.start_workers(concurrency=1)
    pipeline.enqueue(write_prompts(tmp_path / "night.txt", ["a paid fox"]), "night")
    log = tmp_path / "logs" / "worker-0.log"
    # Four tries failed: the child sleeps 5 s before its fifth (posting.RECORD_RETRY_S).
    wait_until(lambda: log.read_text().count("not recorded yet") >= 4, 30, "four tries failed")
    proxy.down_for(0)
    for child in psutil.Process(pipeline.processes[0].pid).children():
        child.kill()

    counts = pipeline.wait_finished("night", timeout_s=60)

    assert counts == {**counts, "done": 1, "failed": 0}, counts
    (paid,) = pipeline.ledger()
    (video,) = (tmp_path / "videos" / "night").glob("*.mp4")
    assert hashlib.sha256(video.read_bytes()).hexdigest() == paid["sha256"]
    assert "its pool child died running it" in log.read_text()


@pytest.mark.slow
def test_a_pool_child_killed_while_its_worker_is_cut_off_from_redis_leaves_its_job_alive(
        make_pipeline, make_sandbox, redis_url, tmp_path):
    """The same child death, its worker cut off from Redis (a partition) and
    so unable to replay; another worker on the machine, sharing the journal,
    reaches Redis. Its submit re-sent found the marker and no id and failed
    the job "outcome unknown" for ~30 s, until its journal pass revived it
    (review 103). The submit now reads the journal before it gives up, and
    polls the id it finds at once, not a step grace later (review 104)."""
    import psutil

    pipeline, proxy = _redis_away_from_the_post(make_pipeline, make_sandbox, redis_url,
                                                VIDQ_STEP_GRACE_S="60")
    pipeline.start_workers(concurrency=1)
    pipeline.enqueue(write_prompts(tmp_path / "night.txt", ["a paid fox"]), "night")
    direct = JobStore(redis.Redis.from_url(redis_url, decode_responses=True))
    (job_id,) = direct.job_ids("night")
    log = tmp_path / "logs" / "worker-0.log"
    wait_until(lambda: log.read_text().count("not recorded yet") >= 2, 30, "two tries failed")
    pipeline.env["VIDQ_REDIS_URL"] = redis_url  # the second worker reaches Redis
    pipeline.start_workers(concurrency=1)
    for child in psutil.Process(pipeline.processes[0].pid).children():
        child.kill()
    states = set()
    deadline = time.monotonic() + 30  # half the step grace
    try:
        while (state := direct.get(f"night:{job_id}").state) != "done":
            states.add(state)
            assert time.monotonic() < deadline, f"not done in 30 s: {sorted(states)}"
            time.sleep(0.05)
    finally:
        proxy.down_for(0)

    assert "failed" not in states, sorted(states)
    (paid,) = pipeline.ledger()
    (video,) = (tmp_path / "videos" / "night").glob("*.mp4")
    assert hashlib.sha256(video.read_bytes()).hexdigest() == paid["sha256"]
