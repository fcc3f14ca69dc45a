"""The three promises under faults, on real parts: a real redis-server, real
`celery -A worker worker` processes, the sandbox over HTTP, behind the fault
proxy where the network has to misbehave.

Never pay twice: the sandbox's ledger counts generations per prompt.
Never lose a paid video: every generation in the ledger ends as a stored video.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import redis
from conftest import wait_until, write_prompts

from worker import keys


def _one_prompt_through(proxied, tmp_path, fault: str, count: int, batch: str, prompt: str):
    """A one-prompt batch whose first `count` POSTs meet `fault` at the fault
    proxy, its workers started: (pipeline, proxy)."""
    pipeline, proxy = proxied()
    proxy.queue(fault, count=count, method="POST")
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [prompt]), batch)
    return pipeline, proxy


def _generations_per_prompt(pipeline) -> Counter:
    return Counter(entry["prompt"] for entry in pipeline.ledger())


@pytest.mark.parametrize("fault", ["reset_after_send", "close_after_send", "gateway_502",
                                   "gateway_504"])
def test_a_post_accepted_but_its_answer_lost_is_never_posted_again(proxied, tmp_path, fault):
    """The upstream created the generation, the answer never arrived: the job ends
    failed 'outcome_unknown', and the ledger shows one generation, not two."""
    pipeline, proxy = _one_prompt_through(proxied, tmp_path, fault, 1, "lost",
                                          "lost answer")

    counts = pipeline.wait_finished("lost", timeout_s=60)

    assert counts["failed"] == 1 and proxy.counts[fault] == 1
    (job_id,) = pipeline.store.job_ids("lost")
    job = pipeline.store.get(keys.job_ref("lost", job_id))
    assert job.last_error.startswith("outcome_unknown")
    assert pipeline.store.outcome_unknown("lost") == 1
    time.sleep(2)  # give any wrongful re-POST time to happen
    assert _generations_per_prompt(pipeline) == {"lost answer": 1}


@pytest.mark.parametrize("fault", ["truncate_json", "truncate_body"])
def test_a_posts_answer_cut_short_after_its_id_gets_its_video(proxied, tmp_path, fault):
    """The upstream created the generation and its answer was cut off after
    the id (by a gateway, or the connection lost mid-body). The job used to
    end "outcome unknown", its paid video never fetched. Now the id is read
    from the part that came: one POST, the video stored, its bytes the
    upstream's."""
    pipeline, proxy = _one_prompt_through(proxied, tmp_path, fault, 1, "cut",
                                          "cut answer")

    assert pipeline.wait_finished("cut", timeout_s=60)["done"] == 1
    assert proxy.counts[fault] == 1
    [generation] = pipeline.ledger()
    [job_id] = pipeline.store.job_ids("cut")
    assert pipeline.store.get(keys.job_ref("cut", job_id)).generation_id == generation["id"]
    stored = tmp_path / "videos" / "cut" / f"{job_id}.mp4"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == generation["sha256"]
    log = (pipeline.log_dir / "worker-0.log").read_text()
    assert f"named generation {generation['id']} first: recorded" in log


@pytest.mark.parametrize("fault", ["503", "429"])
def test_a_post_the_upstream_surely_refused_is_retried_and_succeeds(proxied, tmp_path, fault):
    pipeline, proxy = _one_prompt_through(proxied, tmp_path, fault, 2, "again",
                                          "try again")

    assert pipeline.wait_finished("again", timeout_s=60)["done"] == 1
    assert proxy.counts[fault] == 2
    assert _generations_per_prompt(pipeline) == {"try again": 1}


def test_connection_refused_is_retried_and_succeeds(proxied, tmp_path):
    """Nothing listens for a while (ECONNREFUSED: no byte sent): retried, one generation."""
    pipeline, proxy = proxied()
    pipeline.start_workers()
    proxy.pause_listening()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["nobody home"]), "refused")
    deadline = time.monotonic() + 30
    ref = keys.job_ref("refused", pipeline.store.job_ids("refused")[0])
    while time.monotonic() < deadline and int(pipeline.store.get(ref).attempts) < 1:
        time.sleep(0.1)
    assert "not sent" in pipeline.store.get(ref).last_error
    proxy.resume_listening()

    assert pipeline.wait_finished("refused", timeout_s=60)["done"] == 1
    assert _generations_per_prompt(pipeline) == {"nobody home": 1}


def test_a_trickled_answer_ends_the_step_but_its_late_id_is_still_downloaded(
        proxied, tmp_path):
    """A POST answered one byte at a time outlives VIDQ_POST_DEADLINE_S: the job is
    'outcome unknown' for a while, then the id arrives, is recorded, and the video lands."""
    pipeline, proxy = proxied(VIDQ_POST_DEADLINE_S="1")
    proxy.trickle_interval_s = 0.01
    proxy.queue("trickle", count=1, method="POST")
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["slow answer"]), "trickle")
    (job_id,) = pipeline.store.job_ids("trickle")
    ref = keys.job_ref("trickle", job_id)

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and pipeline.store.get(ref).state != "done":
        time.sleep(0.2)

    job = pipeline.store.get(ref)
    assert job.state == "done", job.extra
    assert job.extra.get("recovered") == "1"
    assert _generations_per_prompt(pipeline) == {"slow answer": 1}
    assert (tmp_path / "videos" / "trickle" / f"{job_id}.mp4").stat().st_size > 0


def test_a_worker_killed_mid_post_never_causes_a_second_post(proxied, tmp_path):
    """SIGKILL while the POST's answer is on its way: the recovered submit finds the
    'POST started' marker and does not POST again."""
    pipeline, proxy = proxied(VIDQ_POST_DEADLINE_S="4")
    proxy.trickle_interval_s = 0.2  # the answer takes ~1 min: the worker dies first
    proxy.queue("trickle", count=1, method="POST")
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["killed mid post"]), "midpost")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not pipeline.ledger():
        time.sleep(0.05)
    assert pipeline.ledger(), "the POST never reached the upstream"

    os.killpg(os.getpgid(pipeline.processes[0].pid), signal.SIGKILL)
    pipeline.processes[0].wait()
    pipeline.processes = []
    proxy.clear()
    pipeline.start_workers()
    counts = pipeline.wait_finished("midpost", timeout_s=60)

    assert counts["failed"] == 1
    (job_id,) = pipeline.store.job_ids("midpost")
    assert "outcome_unknown" in pipeline.store.get(keys.job_ref("midpost", job_id)).last_error
    assert _generations_per_prompt(pipeline) == {"killed mid post": 1}


def test_c_is_the_deployments_value_not_the_producers_shell(make_pipeline, make_sandbox,
                                                          tmp_path):
    """Workers say C = 2; a producer whose shell says 8 still admits at most 2."""
    sandbox = make_sandbox(max_concurrency=100)
    pipeline = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT=2)
    pipeline.start_workers()
    producer = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT=8)
    producer.enqueue(write_prompts(tmp_path / "p.txt", [f"cap {i}" for i in range(10)]), "c")

    assert pipeline.wait_finished("c", timeout_s=90)["done"] == 10
    assert sandbox.stats()["max_in_flight"] == 2


@pytest.mark.slow
def test_a_killed_workers_countdowns_resume_long_before_the_step_grace(
        make_pipeline, make_sandbox, tmp_path):
    """SIGKILL a worker holding countdown polls: the jobs name it as their holder, its
    heartbeat expires, and the reconciler re-sends them (the 90 s grace never matters)."""
    sandbox = make_sandbox(time_scale=9)  # ~10 s generations
    pipeline = make_pipeline(sandbox, VIDQ_STEP_GRACE_S=90, VIDQ_EXPECTED_GENERATION_S=10,
                             VIDQ_POLL_MAX_INTERVAL_S=20)
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"holder {i}" for i in range(4)]), "hk")
    pipeline.wait_polls_held("hk", 4)
    killed_at = time.monotonic()
    os.killpg(os.getpgid(pipeline.processes[0].pid), signal.SIGKILL)
    pipeline.processes[0].wait()
    pipeline.processes = []
    pipeline.start_workers()

    counts = pipeline.wait_finished("hk", timeout_s=60)
    recovered_in = time.monotonic() - killed_at

    assert counts["done"] == 4
    assert recovered_in < 60  # the 90 s step grace alone could not explain this
    assert sandbox.stats()["submissions"] == 4


def test_storage_unavailable_for_a_while_then_back(make_pipeline, tmp_path):
    """The batch directory cannot be created (a file is in the way): downloads retry
    with backoff, publish nothing partial, and land when storage comes back."""
    pipeline = make_pipeline(VIDQ_MAX_ATTEMPTS=3)
    blocker = tmp_path / "videos" / "st"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a directory")
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["disk away", "disk back"]), "st")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        jobs = [pipeline.store.get(keys.job_ref("st", i)) for i in pipeline.store.job_ids("st")]
        if all(int(j.extra.get("attempts") or 0) >= 3 for j in jobs):
            break
        time.sleep(0.2)
    assert all(j.state == "downloading" for j in jobs), [j.state for j in jobs]
    blocker.unlink()

    assert pipeline.wait_finished("st", timeout_s=60)["done"] == 2
    deadline = time.monotonic() + 20  # the batch's manifest is the last file written
    while not (tmp_path / "videos" / "st" / "manifest.jsonl").exists():
        assert time.monotonic() < deadline, "no manifest for the finished batch"
        time.sleep(0.1)
    assert not list((tmp_path / "videos").rglob("*.part"))
    assert pipeline.sandbox.stats()["submissions"] == 2


def test_a_video_completing_near_the_hard_limit_waits_out_a_storage_outage(make_pipeline,
                                                                           make_sandbox, tmp_path):
    """The hard limit counted from the submit: a video that completed near it
    had the rest of it, minutes at most, to be stored, and a short storage
    outage then failed it for good, paid and never downloaded. A completed
    video's downloads now count from its completion, as its link's life does."""
    sandbox = make_sandbox(time_scale=1, mean_generation_s=4, spread=0)
    pipeline = make_pipeline(sandbox, VIDQ_EXPECTED_GENERATION_S=4, VIDQ_DEADLINE_S=5,
                             VIDQ_HARD_LIMIT_S=6, VIDQ_MAX_ATTEMPTS=3)
    blocker = tmp_path / "videos" / "late"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a directory")  # storage refuses every download
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["stored late"]), "late")
    [job_id] = pipeline.store.job_ids("late")
    ref = keys.job_ref("late", job_id)
    wait_until(lambda: pipeline.store.get(ref).submitted_at, 30, "the POST")
    submitted = pipeline.store.get(ref).submitted_at
    # Past the hard limit after the submit, with the download's attempts spent.
    wait_until(lambda: time.time() > submitted + 9, 30, "the hard limit to pass")
    job = pipeline.store.get(ref)
    assert job.state == "downloading" and int(job.extra.get("attempts") or 0) >= 3, job.extra
    blocker.unlink()

    assert pipeline.wait_finished("late", timeout_s=30)["done"] == 1
    [generation] = pipeline.ledger()
    stored = tmp_path / "videos" / "late" / f"{job_id}.mp4"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == generation["sha256"]


def test_sigterm_hands_countdowns_back_and_nothing_is_lost(make_pipeline, make_sandbox,
                                                          tmp_path):
    sandbox = make_sandbox(time_scale=15)  # ~6 s generations
    pipeline = make_pipeline(sandbox, VIDQ_EXPECTED_GENERATION_S=6)
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"term {i}" for i in range(4)]), "tm")
    time.sleep(3)
    pipeline.stop_workers()  # SIGTERM: warm shutdown
    pipeline.start_workers()

    assert pipeline.wait_finished("tm", timeout_s=90)["done"] == 4
    assert sandbox.stats()["submissions"] == 4


def _running_on(restartable_redis, make_pipeline, make_sandbox, tmp_path, batch: str,
                prompts: list[str], workers: int = 1):
    """A batch of ~3 s generations on a Redis the test may stop, fill or restart."""
    sandbox = make_sandbox(time_scale=30, max_concurrency=100)
    pipeline = make_pipeline(sandbox, VIDQ_REDIS_URL=restartable_redis.url,
                             VIDQ_EXPECTED_GENERATION_S=3)
    pipeline.start_workers(count=workers, concurrency=2)
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", prompts), batch)
    return pipeline


@pytest.mark.slow
def test_redis_restarted_twice_mid_batch_completes_with_no_duplicate_post(
        make_pipeline, make_sandbox, tmp_path, restartable_redis):
    """Redis (AOF, fsync always) stopped and started twice during a batch: the workers
    survive (the kombu workaround), every job ends done, every prompt POSTed once."""
    prompts = [f"restart {i}" for i in range(12)]
    pipeline = _running_on(restartable_redis, make_pipeline, make_sandbox, tmp_path, "rr",
                           prompts, workers=2)
    for _ in range(2):
        time.sleep(3)
        restartable_redis.stop()
        time.sleep(2)
        restartable_redis.start()

    counts = pipeline.wait_finished("rr", timeout_s=150)

    assert counts["done"] == 12, counts
    assert all(p.poll() is None for p in pipeline.processes), "a worker exited"
    assert _generations_per_prompt(pipeline) == Counter({p: 1 for p in prompts})


def test_requeue_keeps_every_queued_job_in_line_and_a_late_id_leaks_no_slot(make_pipeline,
                                                                            tmp_path):
    """After `vidq retry`, a job is in its batch's line exactly when it is queued; an
    id recorded for a requeued job makes it poll, and the slot count stays exact."""
    pipeline = make_pipeline()
    store, admission = pipeline.store, pipeline.admission
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["a", "b", "c"]), "rq")
    assert admission.in_flight() == 0  # no worker has said what C is: nothing admitted
    admission.set_cap(4)
    for ref, _token in admission.pump():
        job = store.get(ref)
        store.transition(job, state="failed", release_slot=True, expected_token="*")
    assert admission.in_flight() == 0

    assert admission.requeue_failed("rq") == {"requeued": 3}
    line = set(store.redis.zrange(keys.batch_line("rq"), 0, -1))
    assert line == set(store.job_ids("rq"))
    late = store.get(keys.job_ref("rq", store.job_ids("rq")[0]))
    store.record_generation(late, "gen-late", 5)
    admitted = admission.pump()

    assert len(admitted) == 2 and admission.in_flight() == 3  # the late one holds its own
    assert store.get(late.ref).state == "submitted"


@pytest.mark.parametrize("faults", [{"poll": [404, 401, 403]}, {"download": [403] * 9 + [400]},
                                    {"download": [400, 401, 400]}],
                         ids=["status-4xx", "result-expired", "result-4xx"])
@pytest.mark.slow
def test_4xx_answers_about_a_paid_generation_never_abandon_its_video(make_pipeline, tmp_path,
                                                                    faults):
    """A paid generation's status GETs answered 404, 401, 403 (a gateway's hiccup, a
    key being rotated), or its result URL refused ten times (400s too, as some CDNs
    answer an expired signature): it is asked again until the hard limit, each
    refused result through a poll for a fresh link, and the video lands, downloaded once."""
    pipeline = make_pipeline(VIDQ_MAX_ATTEMPTS=3)
    pipeline.start_workers()
    pipeline.faults(**faults)
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["a paid red kite"]), "k")

    counts = pipeline.wait_finished("k", timeout_s=90)

    job = pipeline.store.get(keys.job_ref("k", pipeline.store.job_ids("k")[0]))
    assert counts["done"] == 1, job.last_error
    assert int(job.number("link_refreshes")) == len(faults.get("download", []))
    (generation,) = pipeline.ledger()
    assert generation["status"] == "completed" and generation["downloads"] == 1


@pytest.mark.slow
def test_a_download_slower_than_its_lease_is_renewed_not_sent_again(proxied, make_sandbox,
                                                                    tmp_path):
    """A result served at 40 kB/s takes ~6 s against a 2 s download lease: the
    running download renews its lease, no second copy starts, and the job ends done."""
    sandbox = make_sandbox(pad_video_to=240_000)
    pipeline, proxy = proxied(sandbox, VIDQ_DOWNLOAD_GRACE_S="2")
    proxy.throttle_bps = 40_000
    proxy.set_rates({"throttle": 1.0}, methods="GET", path_prefix="/files/")
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["a slow download"]), "slow")

    assert pipeline.wait_finished("slow", timeout_s=60)["done"] == 1

    (generation,) = pipeline.ledger()
    assert generation["downloads"] == 1
    assert "re-sending download" not in (pipeline.log_dir / "worker-0.log").read_text()


@pytest.mark.slow
def test_a_sigterm_while_a_posts_answer_is_on_its_way_keeps_the_paid_id(proxied, tmp_path):
    """SIGTERM (warm shutdown) while a POST's answer trickles in for ~10 s, past its
    2 s deadline: the stopping pool child waits for the answer and records the id;
    the next worker downloads the video. One POST, one video."""
    pipeline, proxy = proxied(VIDQ_POST_DEADLINE_S="2")
    proxy.trickle_interval_s = 0.05
    proxy.queue("trickle", count=1, method="POST")
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["stopped mid answer"]), "term")
    wait_until(pipeline.ledger, 30, "the POST upstream", every_s=0.05)

    pipeline.processes[0].send_signal(signal.SIGTERM)
    pipeline.processes[0].wait(90)
    pipeline.processes = []
    (job_id,) = pipeline.store.job_ids("term")
    recorded = pipeline.store.get(keys.job_ref("term", job_id)).generation_id
    pipeline.start_workers()

    assert recorded == pipeline.ledger()[0]["id"]
    assert pipeline.wait_finished("term", timeout_s=60)["done"] == 1
    assert _generations_per_prompt(pipeline) == {"stopped mid answer": 1}


def test_a_redis_that_may_evict_any_key_is_refused_and_a_volatile_one_warned_of(
        make_pipeline, restartable_redis, tmp_path):
    """maxmemory-policy allkeys-lru could evict a paid job's record (its
    generation id): a worker refuses to start. volatile-lru only touches keys
    with a TTL: the worker runs and says what may vanish."""
    client = redis.Redis.from_url(restartable_redis.url)
    pipeline = make_pipeline(VIDQ_REDIS_URL=restartable_redis.url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    log = tmp_path / "evicting.log"
    with log.open("w") as out:
        refused = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "worker", "-c", "1", "-n",
             "evicting@%h", "--loglevel", "INFO", "--without-mingle", "--without-gossip"],
            env=pipeline.env, stdout=out, stderr=subprocess.STDOUT)
        try:
            assert refused.wait(timeout=90) != 0
        except subprocess.TimeoutExpired:
            refused.kill()
            raise AssertionError("the worker started on an allkeys-lru Redis") from None
    assert "Redis maxmemory-policy is allkeys-lru" in log.read_text()

    client.config_set("maxmemory-policy", "volatile-lru")
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["kept in memory"]), "volatile")
    assert pipeline.wait_finished("volatile", timeout_s=60)["done"] == 1
    assert "WARNING" in next(line for line in (pipeline.log_dir / "worker-0.log").read_text()
                             .splitlines() if "maxmemory-policy is volatile-lru" in line)


@pytest.mark.slow
def test_a_redis_full_for_a_while_stops_no_worker_and_pays_nothing_twice(
        make_pipeline, make_sandbox, tmp_path, restartable_redis):
    """Redis at maxmemory with noeviction refuses every write for 6 s, mid-batch:
    the workers ride it out (an ack it refused used to end the worker), every job
    ends done, every prompt POSTed once."""
    prompts = [f"full memory {i}" for i in range(8)]
    pipeline = _running_on(restartable_redis, make_pipeline, make_sandbox, tmp_path, "full",
                           prompts)
    client = redis.Redis.from_url(restartable_redis.url)
    time.sleep(2)
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) - 100_000)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("probe", "x")
    time.sleep(6)
    client.config_set("maxmemory", 0)

    counts = pipeline.wait_finished("full", timeout_s=150)

    assert counts["done"] == 8, counts
    assert all(p.poll() is None for p in pipeline.processes), "a worker exited"
    assert _generations_per_prompt(pipeline) == Counter({p: 1 for p in prompts})


@pytest.mark.slow
def test_status_watch_rides_out_a_redis_restart_and_exits_for_the_batch(
        make_pipeline, make_sandbox, tmp_path, restartable_redis):
    """Redis down for 2 s while `vidq status --watch` follows a batch: the watch
    says so and goes on, and exits 0 when every job is done (it used to exit 2
    with 'cannot use Redis' on a clean night)."""
    pipeline = _running_on(restartable_redis, make_pipeline, make_sandbox, tmp_path, "w",
                           [f"watched {i}" for i in range(8)])
    watching = subprocess.Popen(["vidq", "status", "w", "--watch", "--every", "1"],
                                env=pipeline.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    # Down only once the watch is watching (a loaded machine starts it slowly),
    # for more than two of its rounds.
    first_line = watching.stdout.readline()  # type: ignore[union-attr]
    restartable_redis.stop()
    time.sleep(3)
    restartable_redis.start()
    rest, _ = watching.communicate(timeout=150)
    output = first_line + rest

    assert watching.returncode == 0, output
    assert "Redis unreachable" in output and "8/8 ended" in output
