"""Replies Redis sent that never reached the worker (a dropped connection, a
Redis restart just after the command). redis-py sends the call again; each
step must then go on as if the first answer had arrived, not read its own
change as "another step took the job" and stop the job's chain until the
reconciler re-sends it (a finished, paid video would wait ~95 s).

Real Redis behind a proxy that resets the connection after Redis ran the
command (tests/chaos/redis_lost_reply.py); the sandbox over HTTP."""
from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest
import redis
from chaos.faultproxy import FaultProxy
from chaos.redis_lost_reply import LostReplyProxy
from conftest import wait_until
from redis.backoff import NoBackoff
from redis.retry import Retry
from test_steps import _admit_one, _run, _until_completed, steps_for  # noqa: F401 - fixture

from worker import keys, webhooks
from worker.errors import SubmitOutcomeUnknown
from worker.jobs import OUTCOME_UNKNOWN, load_script
from worker.metrics import COMPLETIONS, STATUS_GETS_PER_VIDEO, bucket_field, counter_field
from worker.metrics_record import Recorder
from worker.reaim import reaim_first_polls

SHAPE = ("alibaba/wan2.1-t2v-turbo", "720P")
TO_DOWNLOAD = b"$11\r\ndownloading\r\n$8\r\ndownload\r\n"  # a transition's state, next step
TO_FAILED = b"$6\r\nfailed\r\n$0\r\n"


def _run_of(script) -> bytes:
    """The request that runs `script` (not a pipeline's SCRIPT EXISTS of it)."""
    return b"EVALSHA\r\n$40\r\n" + script.sha.encode()


@pytest.fixture
def proxied(steps_for, redis_url, make_sandbox):  # noqa: F811
    """Steps whose every Redis call goes through a LostReplyProxy; `steps.direct`:
    another worker's, on the same Redis without the proxy."""
    url = urlsplit(redis_url)
    proxy = LostReplyProxy(url.hostname, url.port)
    sandbox = make_sandbox()
    steps = steps_for(sandbox, VIDQ_REDIS_URL=f"redis://127.0.0.1:{proxy.port}{url.path}")
    steps.direct = steps_for(sandbox)
    # Loaded, as in a running worker: a lost NOSCRIPT answer would test nothing.
    for script in [*steps.store._scripts.values(), *steps.admission._scripts.values()]:
        steps.store.redis.script_load(getattr(script, "_script", script).script)
    return steps, proxy, sandbox


def test_a_lost_reply_to_the_completion_still_sends_the_download(proxied):
    """The poll that finds the video done moves the job to its download; the reply
    is lost. The download is still sent at once, and the plan learns it once."""
    steps, proxy, _ = proxied
    ref, token = _admit_one(steps)
    proxy.arm(TO_DOWNLOAD)
    token = _until_completed(steps, ref, token)

    assert proxy.lost == 1
    record = steps.store.get(ref)
    assert (record.state, record.step, record.token) == ("downloading", "download", token)
    assert steps.store.redis.llen(keys.durations(*SHAPE)) == 1
    assert _run(steps, "download", ref, token).state == "done"


def test_a_lost_reply_to_the_post_marker_still_posts_once(proxied):
    """The "POST started" marker is written and its reply lost: the same call, sent
    again, is not taken for an earlier POST whose answer never came."""
    steps, proxy, sandbox = proxied
    ref, token = _admit_one(steps)
    proxy.arm(_run_of(steps.store._scripts["mark_posting"]))
    record = _run(steps, "submit", ref, token)

    assert proxy.lost == 1
    assert record.generation_id and record.state == "submitted" and not record.last_error
    assert sandbox.stats()["submissions"] == 1


def test_a_lost_reply_to_clearing_a_late_refused_posts_marker_still_revives_it(
        steps_for, redis_url, make_sandbox):  # noqa: F811
    """A POST's answer trickles in past VIDQ_POST_DEADLINE_S: the job fails "outcome
    unknown", its slot held. The answer is a 429, so nothing was created: the marker
    is cleared and the job revived. The clearing's reply is lost; sent again, it
    must still say the marker was this POST's, or the job stays "outcome unknown"
    holding its slot for VIDQ_DEADLINE_S (and counted as maybe paid)."""
    url = urlsplit(redis_url)
    proxy = LostReplyProxy(url.hostname, url.port)
    sandbox = make_sandbox()
    http = FaultProxy(sandbox.url, seed=3, trickle_interval_s=0.02).start()
    try:
        steps = steps_for(sandbox, VIDQ_REDIS_URL=f"redis://127.0.0.1:{proxy.port}{url.path}",
                          AIMLAPI_BASE_URL=http.url, VIDQ_POST_DEADLINE_S="1")
        for script in [*steps.store._scripts.values(), *steps.admission._scripts.values()]:
            steps.store.redis.script_load(getattr(script, "_script", script).script)
        sandbox.state.add_faults({"submit": [429]})
        http.queue("trickle", count=1, method="POST")
        proxy.arm(_run_of(steps.store._scripts["clear_posting"]))
        ref, token = _admit_one(steps)
        job = steps.claim(ref, token, "submit")
        with pytest.raises(SubmitOutcomeUnknown):
            steps.submit(job)
        steps.fail(job, f"{OUTCOME_UNKNOWN}: no answer in time")

        def revived() -> bool:
            record = steps.store.get(ref)
            return record.state != "failed" and not record.extra.get("outcome_unknown")
        wait_until(revived, 30, "the job revived by the late 429")
    finally:
        http.stop()

    assert proxy.lost == 1
    assert not steps.store.redis.sismember(keys.batch_unknown("b"), ref)
    assert sandbox.stats()["submissions"] == 0


def test_a_lost_reply_to_a_claim_still_runs_the_step(proxied):
    steps, proxy, sandbox = proxied
    ref, token = _admit_one(steps)
    proxy.arm(_run_of(steps.store._scripts["claim"]))
    job = steps.claim(ref, token, "submit")

    assert proxy.lost == 1 and job is not None
    steps.submit(job)
    assert steps.store.get(ref).generation_id and sandbox.stats()["submissions"] == 1
    assert steps.claim(ref, token, "submit") is None  # the message again: stale


def test_a_lost_reply_to_a_failure_still_settles_its_credits(proxied):
    """A job that fails before its POST gives back the credits its admission
    committed, even when the reply to its failure is lost."""
    steps, proxy, _ = proxied
    ref, token = _admit_one(steps)
    job = steps.claim(ref, token, "submit")
    committed = float(steps.store.redis.hget(keys.batch("b"), "credits_committed") or 0)
    proxy.arm(TO_FAILED)
    steps.fail(job, "submit: refused")

    assert proxy.lost == 1 and job.failed
    assert steps.store.get(ref).state == "failed"
    assert committed > 0
    assert float(steps.store.redis.hget(keys.batch("b"), "credits_committed") or 0) == 0


def test_a_lost_reply_to_a_reaim_still_sends_the_new_poll(proxied):
    steps, proxy, _ = proxied
    ref, token = _admit_one(steps)
    _run(steps, "submit", ref, token)  # first poll aimed at the 1 s prior
    proxy.arm(b"first_aim")
    moved = reaim_first_polls(steps.store, steps.dispatch, SHAPE, 0.5, 0.1, 5.0)

    assert proxy.lost == 1 and moved == 1
    step, _, new_token = steps.sent[-1]
    assert step == "poll" and steps.store.get(ref).token == new_token


def test_a_first_poll_running_now_is_not_reaimed(steps_for):  # noqa: F811
    """Re-aim must not supersede a poll that is looking already: two polls of one
    job would race, and the running one's answer would be thrown away."""
    steps = steps_for()
    ref, token = _admit_one(steps)
    _run(steps, "submit", ref, token)
    running = steps.claim(ref, steps.sent[-1][2], "poll")
    assert running is not None

    assert reaim_first_polls(steps.store, steps.dispatch, SHAPE, 0.5, 0.1, 5.0) == 0
    time.sleep(1.2)
    steps.poll(running)
    assert steps.store.get(ref).state in ("generating", "downloading")
    assert running.outcome and "taken over" not in running.outcome


def test_a_lost_reply_to_an_admission_still_sends_the_admitted_jobs(proxied):
    """The pump takes slots for waiting jobs and its reply is lost: the same call
    sent again answers with those jobs (to be submitted now), admits no others,
    and the cap holds."""
    steps, proxy, _ = proxied
    steps.admission.enqueue("b", [(f"j{i}", {"model": SHAPE[0], "prompt": f"p {i}"})
                                  for i in range(6)], time.time())
    proxy.arm(_run_of(steps.admission._scripts["pump"]))
    admitted = steps.admission.pump()

    assert proxy.lost == 1
    assert len(admitted) == 4 == steps.admission.in_flight()  # the cap set by steps_for
    for ref, token in admitted:
        assert steps.store.get(ref).token == token


def _failed_job(steps, job_id="j1"):
    ref, token = _admit_one(steps, job_id=job_id)
    steps.fail(steps.claim(ref, token, "submit"), "submit: refused")
    return ref


def test_a_lost_reply_to_vidq_retry_still_counts_and_reopens_the_batch(proxied):
    """`vidq retry` puts failed jobs back in line in one pipeline; its reply is lost.
    The re-sent pipeline answers 'requeued' (not 'not_failed'), so the user is told
    the truth and the batch is marked reopened (its manifest is written again)."""
    from worker.retry import failures, retry

    steps, proxy, _ = proxied
    _failed_job(steps)
    proxy.arm(_run_of(steps.admission._scripts["requeue"]))
    result = retry(steps.admission, steps.dispatch, "b", failures(steps.store, "b"))

    assert proxy.lost == 1
    assert result.requeued == 1 and result.answers == {"requeued": 1}
    assert steps.store.redis.hget(keys.batch("b"), "reopened") == "1"


def test_a_lost_reply_to_the_manifest_mark_announces_the_batch_once(proxied):
    """The manifest's mark and its `batch.finished` event are one call; sent again
    after a lost reply, it says "written" and adds no second event (a second
    webhook with a new id, which receivers could not de-duplicate)."""
    from worker import events, manifest

    steps, proxy, _ = proxied
    _failed_job(steps)
    settings = steps.settings
    script = events.batch_finished_script(steps.store.redis, settings.storage_url, "b")
    steps.store.redis.script_load(script._script.script)
    proxy.arm(_run_of(script._script))
    written = manifest.write_if_finished(steps.store.redis, steps.storage, settings.storage_url,
                                         "b", settings.retention_s)

    assert proxy.lost == 1 and written
    types = [fields["type"] for _, fields in steps.store.redis.xrange(keys.EVENTS)]
    assert types.count("batch.finished") == 1


def test_a_lost_reply_to_a_lock_is_still_the_writers_lock(proxied):
    """A SET NX whose reply was lost is sent again and finds the key taken, by
    itself: the manifest is written now, not after the lock's ten minutes."""
    from worker import manifest

    steps, proxy, _ = proxied
    _failed_job(steps)
    proxy.arm(keys.manifest_lock("b").encode())
    written = manifest.write_if_finished(steps.store.redis, steps.storage,
                                         steps.settings.storage_url, "b", 3600)

    assert proxy.lost == 1 and written
    assert steps.store.redis.exists(keys.manifest_lock("b")) == 0  # released


def test_a_lost_reply_to_a_second_generation_id_makes_one_sibling(proxied):
    """An old POST answering late with a second id becomes one sibling job whose
    video is downloaded; recorded again after a lost reply, still one."""
    steps, proxy, _ = proxied
    ref, token = _admit_one(steps)
    job = steps.claim(ref, token, "submit")
    steps.store.record_generation(job, "gen-A", 60)
    proxy.arm(_run_of(steps.store._scripts["record_generation"]))
    steps.store.record_generation(job, "gen-B", 60)

    assert proxy.lost == 1
    assert steps.store.job_ids("b") == ["j1", "j1~2"]
    assert steps.store.batch_total("b") == 2


def test_a_lost_reply_to_an_enqueue_still_counts_the_jobs_written(proxied):
    steps, proxy, _ = proxied
    proxy.arm(_run_of(steps.admission._scripts["enqueue"]))
    created = steps.admission.enqueue(
        "b", [(f"j{i}", {"model": SHAPE[0], "prompt": f"p {i}"}) for i in range(3)],
        time.time())

    assert proxy.lost == 1 and created == 3
    assert steps.admission.enqueue("b", [("j1", {"model": SHAPE[0], "prompt": "p 1"})],
                                   time.time()) == 0  # enqueued again later: not new


def test_a_post_marker_sent_again_to_a_restarted_redis_still_posts_once(proxied):
    """Redis restarts after writing the marker (durable: AOF), before its reply:
    the re-sent pipeline meets an empty script cache (NOSCRIPT). It is built
    again, loads its script and gets 'ok': one POST, no outcome unknown."""
    steps, proxy, sandbox = proxied
    ref, token = _admit_one(steps)
    proxy.arm(_run_of(steps.store._scripts["mark_posting"]),
              then=steps.direct.store.redis.script_flush)
    record = _run(steps, "submit", ref, token)

    assert proxy.lost == 1
    assert record.generation_id and not record.last_error
    assert sandbox.stats()["submissions"] == 1


def test_vidq_retry_sent_again_after_a_worker_claimed_its_job_still_counts_it(proxied):
    """A requeued job can be admitted and claimed by another worker before the
    re-send of `vidq retry`'s pipeline: it still answers 'requeued'."""
    from worker.retry import failures, retry

    steps, proxy, _ = proxied
    _failed_job(steps)

    def another_worker_takes_it():
        ((ref, token),) = steps.direct.admission.pump()
        assert steps.direct.claim(ref, token, "submit") is not None

    proxy.arm(_run_of(steps.admission._scripts["requeue"]), then=another_worker_takes_it)
    result = retry(steps.admission, steps.dispatch, "b", failures(steps.store, "b"))

    assert proxy.lost == 1 and result.requeued == 1
    assert steps.store.redis.hget(keys.batch("b"), "reopened") == "1"


def test_a_failure_sent_again_after_a_late_id_revived_the_job_settles_nothing(proxied):
    """The failure's reply is lost; before its re-send, the POST's late answer
    records a generation id and revives the job. The re-send must not answer
    "failed" as before: that would settle the revived job's credits as failed."""
    steps, proxy, _ = proxied
    ref, token = _admit_one(steps)
    job = steps.claim(ref, token, "submit")
    committed = steps.store.redis.hget(keys.batch("b"), "credits_committed")

    def late_answer():
        steps.direct.store.record_generation(steps.direct.store.get(ref), "gen-late", 60)

    proxy.arm(TO_FAILED, then=late_answer)
    steps.fail(job, "submit: no answer in time")

    assert proxy.lost == 1 and not job.failed
    record = steps.store.get(ref)
    assert (record.state, record.generation_id) == ("submitted", "gen-late")
    assert steps.store.redis.hget(keys.batch("b"), "credits_committed") == committed


def test_a_lost_reply_to_vidq_cancel_still_counts_the_jobs_it_cancelled(proxied):
    steps, proxy, _ = proxied
    steps.admission.enqueue("c", [(f"j{i}", {"model": SHAPE[0], "prompt": f"p {i}"})
                                  for i in range(5)], time.time())
    proxy.arm(_run_of(steps.admission._scripts["cancel"]))
    taken, ended = steps.admission.cancel_waiting("c", 100)

    assert proxy.lost == 1 and (taken, ended) == (5, 5)
    assert steps.store.counts("c")["cancelled"] == 5


def _through(proxy: LostReplyProxy, redis_url: str, *scripts: str, **options) -> redis.Redis:
    """A client whose calls go through `proxy`, with the lua/ `scripts` loaded
    (as in a running worker: a lost NOSCRIPT answer would test nothing)."""
    direct = redis.Redis.from_url(redis_url)
    for name in scripts:
        direct.script_load(load_script(direct, name).script)
    db = urlsplit(redis_url).path.strip("/") or "0"
    return redis.Redis(port=proxy.port, db=int(db), decode_responses=True, **options)


def test_a_lost_reply_to_a_metrics_write_counts_once(redis_url):
    """A task's metrics go to Redis and the reply is lost; redis-py sends them
    again. Prometheus must show one video, not two."""
    url = urlsplit(redis_url)
    proxy = LostReplyProxy(url.hostname, url.port)
    recorder = Recorder()
    recorder.count(COMPLETIONS, (*SHAPE, "later_poll"))
    recorder.observe(STATUS_GETS_PER_VIDEO, SHAPE, 2)
    proxy.arm(keys.METRICS.encode())
    recorder.flush(_through(proxy, redis_url, "metrics_apply"))

    metrics = redis.Redis.from_url(redis_url, decode_responses=True).hgetall(keys.METRICS)
    assert proxy.lost == 1 and not recorder.pending()
    assert float(metrics[counter_field(COMPLETIONS, (*SHAPE, "later_poll"))]) == 1
    assert metrics[bucket_field(STATUS_GETS_PER_VIDEO, SHAPE, 2)] == "1"


def test_a_metrics_write_that_failed_after_it_ran_is_sent_again_and_applied_once(redis_url):
    """The reply is lost and the client gives up (no retries left): the write
    may or may not have run. The next flush sends it again, as is, with what
    was counted since: each counted once."""
    url = urlsplit(redis_url)
    proxy = LostReplyProxy(url.hostname, url.port)
    recorder = Recorder()
    field = counter_field(COMPLETIONS, (*SHAPE, "first_poll"))
    recorder.count(COMPLETIONS, (*SHAPE, "first_poll"))
    proxy.arm(keys.METRICS.encode())
    recorder.flush(_through(proxy, redis_url, "metrics_apply", retry=Retry(NoBackoff(), 0)))
    direct = redis.Redis.from_url(redis_url, decode_responses=True)
    assert proxy.lost == 1 and recorder.pending()
    assert float(direct.hget(keys.METRICS, field)) == 1  # it did run

    recorder.count(COMPLETIONS, (*SHAPE, "first_poll"))
    recorder.flush(direct)
    assert float(direct.hget(keys.METRICS, field)) == 2 and not recorder.pending()


def test_a_lost_reply_to_a_webhook_claim_still_sends_the_attempt(redis_url):
    """The claim of a delivery's attempt 0 runs and its reply is lost; sent again,
    it is still this message's claim (not a duplicate's), so the POST goes out
    now, not after the relay finds the attempt overdue (25-30 s later)."""
    url = urlsplit(redis_url)
    proxy = LostReplyProxy(url.hostname, url.port)
    direct = redis.Redis.from_url(redis_url, decode_responses=True)
    webhooks.create(direct, "1-0", {"type": "job.done", "batch": "b"}, "deployment",
                    "https://hooks.example/in")
    ident = webhooks.delivery_id("deployment", "1-0")
    proxy.arm(_run_of(load_script(direct, "webhook_claim")))
    record = webhooks.claim(_through(proxy, redis_url, "webhook_claim"), ident, 0)

    assert proxy.lost == 1
    assert record is not None and record["attempts"] == "1"
    assert webhooks.claim(direct, ident, 0) is None  # a duplicate message of attempt 0


@pytest.mark.slow
def test_a_submit_publish_during_a_redis_blip_waits_for_redis(make_pipeline, make_sandbox,
                                                              tmp_path):
    """Redis is unreachable for 3 s just after the pump took the slots: the
    submits' publish gave up after 0.6 s (Celery's default policy), and the
    jobs, their slots taken, waited a step grace (here 60 s) for the
    reconciler while the upstream sat idle. The publish now rides it out."""
    import subprocess
    import sys

    sandbox = make_sandbox(time_scale=30, max_concurrency=4)
    pipeline = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT="4", VIDQ_STEP_GRACE_S="60")
    pipeline.start_workers(1, concurrency=4)
    url = urlsplit(pipeline.env["VIDQ_REDIS_URL"])
    assert pipeline.admission.pump() == []  # its script cached in Redis: EVALSHA runs
    proxy = LostReplyProxy(url.hostname, url.port)
    proxy.after_reply(b"pump:replay:", lambda: proxy.down_for(3.0))
    env = {**pipeline.env, "VIDQ_REDIS_URL": f"redis://127.0.0.1:{proxy.port}{url.path}"}
    path = tmp_path / "s.txt"
    path.write_text("".join(f"blip {i}\n" for i in range(8)))
    started = time.monotonic()

    enqueued = subprocess.run([sys.executable, "-m", "producer.cli", "enqueue", str(path),
                               "--batch", "s"], env=env, capture_output=True, text=True,
                              timeout=120)

    assert enqueued.returncode == 0, enqueued.stdout + enqueued.stderr
    wait_until(lambda: sandbox.stats()["submissions"] >= 4, 30, "the first POSTs")
    print(f"\nfirst 4 POSTs {time.monotonic() - started:.1f} s after the enqueue began")
    assert time.monotonic() - started < 30
    assert pipeline.wait_finished("s", timeout_s=60)["done"] == 8
