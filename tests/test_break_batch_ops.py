"""Breaking the batch operations' promises (issue 13) on real parts: a real
redis-server, real `celery -A worker worker` processes where a step must run,
the sandbox over HTTP (behind the fault proxy where an answer must be late).

Races that a test cannot hit by timing alone are forced by running one side
of them in this process at the exact point between two Redis calls.
"""
from __future__ import annotations

import dataclasses
import subprocess
import threading
import time
from collections import Counter

import pytest
from conftest import unknown_post_trickling, wait_until, write_prompts

from producer.batch_view import deployment
from producer.enqueue import enqueue_file
from producer.purging import run_purge
from worker import keys, manifest
from worker.batch_control import cancel
from worker.errors import InputError
from worker.jobs import State
from worker.spend import batch_spend
from worker.storage import open_storage
from worker.tasks import build_steps, dispatch

MODEL = "alibaba/wan2.1-t2v-turbo"


def _vidq(pipeline, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["vidq", *args], env=pipeline.env, capture_output=True, text=True,
                          timeout=60)


def test_cancel_landing_between_the_submits_check_and_its_post_is_never_posted(
        make_pipeline, tmp_path):
    """`vidq cancel` returns right after an admitted job's submit checked the
    batch (not cancelled yet) and before it marked its POST: the job must still
    end cancelled, never POSTed, its slot and commitment freed."""
    pipeline = make_pipeline()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["a race at the gate"]), "gate")
    pipeline.admission.set_cap(1)
    (ref, token), = pipeline.admission.pump()
    steps = build_steps(pipeline.settings, "breaker")
    check = steps.admission.cancelled

    def check_then_cancel(batch: str) -> bool:
        answer = check(batch)
        cancel(pipeline.admission, batch)  # the user's `vidq cancel`, right now
        return answer

    steps.admission.cancelled = check_then_cancel  # type: ignore[method-assign]
    steps.submit(steps.claim(ref, token, "submit"))

    assert pipeline.ledger() == []
    assert pipeline.store.get(ref).state == State.CANCELLED
    assert pipeline.admission.in_flight() == 0
    spend = batch_spend(pipeline.store.redis, "gate")
    assert spend["committed"] == 0 and spend["videos"] == 0


def test_cancel_while_a_big_enqueue_is_writing_leaves_no_job_waiting_forever(make_pipeline):
    """`vidq cancel` runs while `vidq enqueue` is still writing a big file into
    the batch: no job may be left queued in a line the pump no longer serves
    (the batch would never finish); the enqueue says the batch was cancelled."""
    pipeline = make_pipeline()
    admission, store = pipeline.admission, pipeline.store
    total, refused = 30000, []

    def enqueue() -> None:
        try:
            admission.enqueue("wrong", ((f"w{i:05d}", {"model": MODEL, "prompt": f"wrong {i}"},
                                         {"line": i + 1}) for i in range(total)), time.time())
        except InputError as exc:
            refused.append(str(exc))

    writer = threading.Thread(target=enqueue)
    writer.start()
    wait_until(lambda: store.batch_total("wrong") > 0, what="the first jobs written")
    cancel(admission, "wrong")
    writer.join(timeout=120)

    counts = store.counts("wrong")
    assert counts["queued"] == 0 and admission.waiting("wrong") == 0, counts
    assert store.batch_total("wrong") < total, "the cancel came too late to race"
    assert counts["cancelled"] == store.batch_total("wrong") == len(store.job_ids("wrong"))
    assert refused and "was cancelled while this enqueue ran" in refused[0]
    leftovers = list(store.redis.scan_iter(keys.job(keys.job_ref("wrong", "*")), count=5000))
    assert len(leftovers) == store.batch_total("wrong")  # no hash of a job never enqueued


def test_cancel_during_a_429_pause_ends_the_job_put_back_and_posts_nothing(
        make_pipeline, tmp_path):
    """A 429 puts the first job back at the front of its line and pauses
    submits; `vidq cancel` meanwhile ends both jobs cancelled, and nothing is
    POSTed when the pause ends."""
    pipeline = make_pipeline(VIDQ_MAX_IN_FLIGHT=1)
    pipeline.start_workers(count=1, concurrency=2)
    # A pause that outlasts a slow `vidq cancel` (at 5 s, +5.5 s before the
    # cancel failed the test), ended by hand once the cancel has run.
    pipeline.faults(submit=[429], retry_after=120)
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["paused 1", "paused 2"]), "held")
    client = pipeline.store.redis
    wait_until(lambda: client.exists(keys.PAUSE_SUBMIT) and pipeline.admission.waiting("held") == 2,
          what="the 429 pause with the job back in line")

    result = _vidq(pipeline, "cancel", "held")
    client.delete(keys.PAUSE_SUBMIT)
    time.sleep(3)  # the pause is over: a wrongful submit would have gone out

    assert result.returncode == 0, result.stderr
    assert "2 waiting jobs cancelled; 0 jobs in flight" in result.stdout, result.stdout
    assert pipeline.store.counts("held")["cancelled"] == 2
    assert pipeline.ledger() == [] and pipeline.admission.in_flight() == 0
    assert batch_spend(client, "held")["committed"] == 0


def test_max_videos_is_not_passed_when_an_unknown_post_answers_late(proxied, tmp_path):
    """--max-videos 1: the first POST's answer is late (outcome unknown for a
    while, then its id arrives and its video is downloaded). Its video slot
    must not be handed to the second job meanwhile: one generation in all."""
    pipeline, proxy = proxied(VIDQ_POST_DEADLINE_S="1")
    proxy.trickle_interval_s = 0.01
    proxy.queue("trickle", count=1, method="POST")
    pipeline.start_workers(count=1, concurrency=2)
    path = write_prompts(tmp_path / "p.txt", ["late one", "late two"])
    enqueue_file(pipeline.admission, path, "one", {"model": MODEL}, dispatch,
                 batch_settings={"max_videos": 1})

    wait_until(lambda: pipeline.store.counts("one")["done"] >= 1, what="the late video stored")
    time.sleep(2)

    assert len(pipeline.ledger()) == 1, pipeline.ledger()
    counts = pipeline.store.counts("one")
    assert counts["done"] == 1 and counts["queued"] == 1, counts
    spend = batch_spend(pipeline.store.redis, "one")
    assert spend["videos"] == 1 and spend["committed"] == 0


def test_purge_while_the_manifest_is_being_written_leaves_a_complete_manifest(make_pipeline):
    """The reconciler is writing a finished batch's manifest when `vidq purge`
    runs: the manifest in storage (what `vidq report` reads afterwards) must
    still hold every job's row."""
    pipeline = make_pipeline()
    admission, settings, client = pipeline.admission, pipeline.settings, pipeline.store.redis
    total = 12000
    admission.enqueue("big", ((f"j{i:05d}", {"model": MODEL, "prompt": f"prompt {i}"},
                               {"line": i + 1}) for i in range(total)), time.time())
    assert cancel(admission, "big").cancelled == total  # every job ended: the batch finished
    storage = open_storage(settings.storage_url, settings.s3_part_bytes)
    writer = threading.Thread(target=manifest.write_if_finished, args=(
        client, storage, settings.storage_url, "big", settings.retention_s))

    writer.start()
    wait_until(lambda: client.exists(keys.manifest_lock("big")), what="the writer's lock")
    said: list[str] = []
    run_purge(admission, settings, "big", echo=said.append)
    writer.join(timeout=60)

    rows = manifest.read(storage, "big")
    assert rows is not None and len(rows) == total, (len(rows or []), said)
    assert client.exists(keys.batch("big"), keys.batch_jobs("big")) == 0
    assert "the manifest stay in storage" in " ".join(said)


def test_a_batch_purged_with_force_and_enqueued_again_gets_one_turn_a_round(make_pipeline,
                                                                          tmp_path):
    """`vidq purge --force` of a batch still waiting, then the same name
    enqueued again beside another batch: round-robin, one job per batch a turn."""
    pipeline = make_pipeline()
    admission = pipeline.admission
    pipeline.enqueue(write_prompts(tmp_path / "a.txt", ["old 1", "old 2"]), "reused")
    run_purge(admission, pipeline.settings, "reused", force=True, echo=lambda _line: None)
    pipeline.enqueue(write_prompts(tmp_path / "b.txt", [f"new {i}" for i in range(3)]),
                     "reused")
    pipeline.enqueue(write_prompts(tmp_path / "c.txt", [f"other {i}" for i in range(3)]),
                     "other")
    admission.set_cap(6)

    order = [ref.split(":")[0] for ref, _token in admission.pump()]

    assert order == ["reused", "other"] * 3


def test_retry_resubmit_run_twice_at_once_posts_one_new_generation_per_job(make_pipeline,
                                                                          tmp_path):
    """Two `vidq retry --resubmit --yes` started together on the same failures:
    one new POST per job in all (sandbox ledger), the old id kept once."""
    pipeline = make_pipeline()
    pipeline.start_workers(count=1, concurrency=4)
    prompts = ["REJECT twice a fox", "REJECT twice a whale"]  # their generations fail
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", prompts), "twice")
    assert pipeline.wait_finished("twice")["failed"] == 2
    store = pipeline.store
    old = {}
    for job_id in store.job_ids("twice"):
        job = store.get(keys.job_ref("twice", job_id))
        old[job.request["prompt"]] = job.generation_id
    sandbox = pipeline.sandbox  # new POSTs of these prompts succeed
    sandbox.state.config = dataclasses.replace(sandbox.state.config, reject_substring="")

    both = [subprocess.Popen(["vidq", "retry", "twice", "--resubmit", "--yes"],
                             env=pipeline.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, text=True) for _ in range(2)]
    answers = [process.communicate(timeout=60) for process in both]
    assert all(process.returncode == 0 for process in both), answers
    wait_until(lambda: store.counts("twice")["done"] == 2, what="both done again")
    time.sleep(1.5)

    assert Counter(entry["prompt"] for entry in pipeline.ledger()) == {p: 2 for p in prompts}
    for job_id in store.job_ids("twice"):
        job = store.get(keys.job_ref("twice", job_id))
        assert job.extra["past_generations"] == f'["{old[job.request["prompt"]]}"]'
        assert job.generation_id not in old.values()


@pytest.mark.slow
def test_a_paid_job_retried_then_cancelled_is_still_downloaded(make_pipeline, make_sandbox,
                                                               tmp_path):
    """A job failed past the hard limit keeps its generation id; its video finished
    meanwhile. `vidq retry` while the one slot is busy, then `vidq cancel`: the paid
    job is not a waiting job to cancel (it takes a slot and polls at once), and its
    video lands, downloaded once."""
    sandbox = make_sandbox(time_scale=9)  # ~10 s generations
    pipeline = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT=1, VIDQ_EXPECTED_GENERATION_S=10,
                             VIDQ_DEADLINE_S=1, VIDQ_HARD_LIMIT_S=3)
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "g.txt", ["a paid green turtle"]), "g")
    assert pipeline.wait_finished("g", timeout_s=30)["failed"] == 1
    wait_until(lambda: pipeline.ledger()[0]["status"] == "completed", 30, "the generation")
    pipeline.enqueue(write_prompts(tmp_path / "busy.txt", ["a busy grey whale"]), "busy")
    wait_until(lambda: pipeline.store.counts("busy")["queued"] == 0, 20, "busy admitted", 0.05)

    retried = _vidq(pipeline, "retry", "g")
    (job_id,) = pipeline.store.job_ids("g")
    state_after_retry = pipeline.store.get(keys.job_ref("g", job_id)).state
    cancelled = _vidq(pipeline, "cancel", "g")

    assert retried.returncode == 0 and cancelled.returncode == 0, retried.stderr
    # Not waiting in line: polled at once (on a fast machine, maybe done already).
    assert state_after_retry in (State.SUBMITTED, State.GENERATING, State.DOWNLOADING,
                                 State.DONE), state_after_retry
    assert pipeline.wait_finished("g", timeout_s=30)["done"] == 1
    downloads = {g["prompt"]: g["downloads"] for g in pipeline.ledger()}
    assert downloads["a paid green turtle"] == 1
    assert (tmp_path / "videos" / "g" / f"{job_id}.mp4").stat().st_size > 0


@pytest.mark.slow
def test_purge_waits_for_an_unknown_posts_answer_and_a_forced_one_keeps_the_id(proxied,
                                                                                tmp_path):
    """A POST whose answer trickles in past its deadline: the batch looks finished,
    but `vidq purge` refuses while the answer may come; with --force, the late id
    finds no job and is kept in vidq:orphans, not retried for an hour."""
    pipeline, proxy = unknown_post_trickling(proxied, tmp_path, "d", "a slow answer, paid",
                                             deadline_s=2)

    refused = _vidq(pipeline, "purge", "d")
    forced = _vidq(pipeline, "purge", "d", "--force")
    proxy.trickle_interval_s = 0.001  # the answer comes once both have run
    orphans = wait_until(lambda: pipeline.store.redis.hgetall(keys.ORPHANS), 30, "the late id")

    assert refused.returncode == 2 and "would find no job to land in" in refused.stderr
    assert forced.returncode == 0, forced.stderr
    (generation,) = pipeline.ledger()
    assert list(orphans) == [generation["id"]]
    assert deployment(pipeline.admission)["orphaned_generations"] == 1  # `vidq status` warns
    assert "not recorded yet" not in (pipeline.log_dir / "worker-0.log").read_text()
