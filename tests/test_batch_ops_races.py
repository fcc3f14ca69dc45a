"""More of the batch operations raced against a running batch (review 23), on
real parts: a real redis-server, real workers, the sandbox over HTTP."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from conftest import unknown_post_trickling, wait_until, write_prompts

from producer.enqueue import enqueue_file
from worker import keys
from worker.batch_control import cancel
from worker.jobs import State
from worker.retry import failures, retry, select
from worker.tasks import dispatch

MODEL = "alibaba/wan2.1-t2v-turbo"


def _vidq(pipeline, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["vidq", *args], env=pipeline.env, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def _failed_with_ids(pipeline, batch: str, prompts: list[str], tmp_path) -> dict[str, str]:
    """A finished batch whose jobs are made failed with their generation ids
    (as if polling them had failed for good, before their videos finished):
    {job id: generation id}."""
    pipeline.enqueue(write_prompts(tmp_path / f"{batch}.txt", prompts), batch)
    assert pipeline.wait_finished(batch)["done"] == len(prompts)
    store, ids = pipeline.store, {}
    for job_id in store.job_ids(batch):
        job = store.get(keys.job_ref(batch, job_id))
        ids[job_id] = job.generation_id
        store.transition(job, state=State.FAILED, expected_token="*", last_error="poll: lost",
                         completed_at="")
    for path in (Path(pipeline.settings.storage_url.removeprefix("file://")) / batch).iterdir():
        path.unlink()
    return ids


def test_retry_resubmit_confirmed_after_a_cancel_keeps_every_generation_id(
        make_pipeline, tmp_path):
    """`vidq retry --resubmit` reads the failures and asks "Continue?"; another
    shell cancels the batch; then the user answers yes. Nothing is requeued,
    and every job keeps its generation id, so a plain `vidq retry` still
    fetches the paid videos (no new POST)."""
    pipeline = make_pipeline()
    pipeline.start_workers()
    ids = _failed_with_ids(pipeline, "rc", ["a kept fox", "a kept whale", "a kept owl"],
                           tmp_path)
    chosen = select(failures(pipeline.store, "rc"))  # what the confirming shell read
    cancel(pipeline.admission, "rc")

    result = retry(pipeline.admission, dispatch, "rc", chosen, resubmit=True)

    for job_id, generation_id in ids.items():
        job = pipeline.store.get(keys.job_ref("rc", job_id))
        assert (job.state, job.generation_id) == (State.FAILED, generation_id)
    assert (result.requeued, result.resubmitted, result.cancelled) == (0, 0, 3)
    polled = _vidq(pipeline, "retry", "rc")
    assert polled.returncode == 0, polled.stderr
    assert pipeline.wait_finished("rc")["done"] == 3
    assert len(pipeline.ledger()) == 3  # the first POSTs only


def test_caps_that_are_not_finite_numbers_are_refused_and_nothing_is_enqueued(
        make_pipeline, tmp_path):
    """`--max-credits nan` was taken, and a cap compared against NaN never
    stops anything: the whole batch ran. NaN, inf and half videos are now one
    error line, exit 2, and nothing is written."""
    pipeline = make_pipeline()
    path = write_prompts(tmp_path / "p.txt", ["a capped cat"])
    refused = [_vidq(pipeline, "enqueue", str(path), "--batch", "nan", "--max-credits", value)
               for value in ("nan", "inf", "-1")]
    refused.append(_vidq(pipeline, "enqueue", str(path), "--batch", "nan", "--max-videos", "2.5"))
    pipeline.enqueue(path, "kept")
    refused += [_vidq(pipeline, "limits", "kept", "--max-credits", "inf"),
                _vidq(pipeline, "limits", "kept", "--max-videos", "2.5")]
    taken = _vidq(pipeline, "limits", "kept", "--max-videos", "2", "--max-credits", "1e5")

    for result in refused:
        assert result.returncode == 2, result.stdout + result.stderr
        assert "is not a non-negative" in result.stderr
    assert pipeline.store.batch_total("nan") == 0
    assert taken.returncode == 0, taken.stderr
    assert "max credits 100,000, max videos 2;" in taken.stdout, taken.stdout


def test_a_waiting_batch_raised_to_high_priority_is_admitted_next(make_pipeline, tmp_path):
    """`vidq limits BATCH --priority high` on a low batch waiting behind a
    normal one: its jobs come next, not once the normal ring is empty."""
    from worker.batch_control import set_priority

    pipeline = make_pipeline()
    admission = pipeline.admission
    pipeline.enqueue(write_prompts(tmp_path / "n.txt", [f"normal {i}" for i in range(4)]), "n")
    path = write_prompts(tmp_path / "l.txt", ["urgent 1", "urgent 2"])
    enqueue_file(admission, path, "l", {"model": MODEL}, dispatch,
                 batch_settings={"priority": "low"})

    set_priority(admission, "l", "high")
    admission.set_cap(6)
    order = [ref.split(":")[0] for ref, _token in admission.pump()]

    assert order == ["l", "l", "n", "n", "n", "n"]


def test_cancel_counts_the_jobs_whose_post_is_on_its_way_as_in_flight(proxied, tmp_path):
    """Two POSTs whose answers trickle in when `vidq cancel` runs: they are
    paid and will be downloaded, and the cancel says so (it said 0 in flight)."""
    pipeline, proxy = proxied(VIDQ_POST_DEADLINE_S="60", VIDQ_STEP_GRACE_S="90")
    # Slow enough that the answers cannot finish (nor pass their deadline) while
    # `vidq cancel` starts up on a loaded machine (at 0.02 s a byte they did
    # once, in CI); sped up once it has run.
    proxy.trickle_interval_s = 0.25
    proxy.queue("trickle", count=2, method="POST")
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["sent 1", "sent 2"]), "c")
    client = pipeline.store.redis
    wait_until(lambda: all(client.hget(keys.job(keys.job_ref("c", job_id)), "posting_at")
                           for job_id in pipeline.store.job_ids("c")), 30, "both POSTs out",
               0.05)

    result = _vidq(pipeline, "cancel", "c")
    proxy.trickle_interval_s = 0.001

    assert result.returncode == 0, result.stderr
    assert "0 waiting jobs cancelled; 2 jobs in flight finish and are downloaded" in \
        result.stdout, result.stdout
    assert pipeline.wait_finished("c", timeout_s=60)["done"] == 2


@pytest.mark.slow
def test_purge_waits_for_a_post_answer_that_outlasts_its_window(proxied, tmp_path):
    """A POST's answer trickles in long after the job failed "outcome unknown",
    past the window purge allowed for it (here: that failure made to look
    older than the window): purge refuses while the answer is being read, and
    the late id lands in its job, whose video is downloaded; nothing orphaned."""
    pipeline, proxy = unknown_post_trickling(proxied, tmp_path, "w",
                                             "a slow answer, still paid", deadline_s=1)
    client = pipeline.store.redis
    client.hincrbyfloat(keys.batch("w"), "unknown_post_at", -3600)  # as if an hour ago

    refused = _vidq(pipeline, "purge", "w")
    proxy.trickle_interval_s = 0.001  # the answer comes once the purge has run

    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "1 POST whose answer is still being read" in refused.stderr
    wait_until(lambda: pipeline.store.counts("w")["done"] == 1, 60, "the late video")
    assert client.hlen(keys.ORPHANS) == 0
    assert _vidq(pipeline, "purge", "w").returncode == 0


def test_resume_says_when_a_spend_cap_still_holds_the_batch(make_pipeline, tmp_path):
    pipeline = make_pipeline()
    path = write_prompts(tmp_path / "p.txt", ["capped 1", "capped 2"])
    enqueue_file(pipeline.admission, path, "cap0", {"model": MODEL}, dispatch,
                 batch_settings={"max_videos": 0})
    pipeline.admission.set_cap(4)
    assert pipeline.admission.pump() == []  # meets the cap: the batch is held

    resumed = _vidq(pipeline, "resume", "cap0")

    assert resumed.returncode == 0, resumed.stderr
    assert "2 jobs waiting; still paused: spend cap (`vidq limits cap0`)" in resumed.stdout


@pytest.mark.slow
def test_a_video_kept_whole_is_taken_by_the_retry_not_bought_again(make_pipeline, tmp_path):
    """The video of a generation was stored but its sidecar never written (the
    job failed at the hard limit, the video's sha256 kept on the job); then
    `vidq retry --resubmit`. The generation finished: nothing is bought again,
    and the kept video is taken (not downloaded again), its sidecar written."""
    from producer.retrying import run_retry

    pipeline = make_pipeline(VIDQ_HARD_LIMIT_S="12", VIDQ_DEADLINE_S="10")
    blocker = tmp_path / "videos" / "k" / "fox.json" / "x"  # the sidecar's path: a directory
    blocker.mkdir(parents=True)
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "k.jsonl",
                                   ['{"id": "fox", "prompt": "a red fox in the snow"}']), "k")
    assert pipeline.wait_finished("k", timeout_s=60)["failed"] == 1
    first = pipeline.store.get(keys.job_ref("k", "fox"))
    assert first.extra.get("kept_sha256")
    blocker.rmdir()
    blocker.parent.rmdir()

    run_retry(pipeline.admission, dispatch, "k", resubmit=True, yes=True, echo=lambda _: None)
    assert pipeline.wait_finished("k", timeout_s=60)["done"] == 1

    assert pipeline.store.get(keys.job_ref("k", "fox")).generation_id == first.generation_id
    [paid] = pipeline.ledger()
    assert paid["id"] == first.generation_id and paid["downloads"] == 1
    card = json.loads((tmp_path / "videos" / "k" / "fox.json").read_text())
    stored = (tmp_path / "videos" / "k" / "fox.mp4").read_bytes()
    assert card["generation_id"] == first.generation_id
    assert card["sha256"] == hashlib.sha256(stored).hexdigest() == paid["sha256"]


def test_an_id_that_differs_only_in_case_from_one_in_the_batch_is_refused(
        make_pipeline, tmp_path):
    """`Intro` enqueued, then `intro` into the same batch from another file: one
    video file on a case-insensitive disk. Refused, naming both; nothing written."""
    pipeline = make_pipeline()
    pipeline.enqueue(write_prompts(tmp_path / "a.jsonl",
                                   ['{"id": "Intro", "prompt": "a title card"}']), "case")
    second = write_prompts(tmp_path / "b.jsonl", ['{"id": "intro", "prompt": "another card"}'])

    refused = _vidq(pipeline, "enqueue", str(second), "--batch", "case")

    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "id 'intro' differs only in case from 'Intro', already in batch 'case'" in \
        refused.stderr
    assert pipeline.store.job_ids("case") == ["Intro"]



def test_a_purged_post_refused_late_gives_back_what_the_purge_booked(make_pipeline, tmp_path):
    """`vidq purge --force` while a job's POST has no answer yet books its
    estimate as spent (it may be charged). The POST is then refused (a 400, a
    429): nothing was created, yet the spend stayed, holding today's credit
    cap until midnight (review 89). The late refusal gives it back; a late
    id keeps it (test_batch_ops.py)."""
    from producer.purging import run_purge
    from worker.jobs import Job

    pipeline = make_pipeline()
    admission, store, client = pipeline.admission, pipeline.store, pipeline.store.redis
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["refused late"]), "p")
    admission.set_cap(1)
    [(ref, _)] = admission.pump()
    client.hset(keys.job(ref), mapping={"posting_at": "1.5", "posting_op": "op-9"})
    today = keys.spend_day(int(client.time()[0]) // 86400)
    each = float(client.hget(keys.job(ref), "credits_pending"))

    run_purge(admission, pipeline.settings, "p", force=True, echo=lambda _: None)
    assert float(client.hget(today, "spent")) == each and float(client.hget(today, "committed")) == 0
    late = Job(batch="p", id=ref.split(":")[1], request={}, state=State.QUEUED,
               extra={"posting_op": "op-9"})
    store.clear_posting(late)

    assert float(client.hget(today, "spent")) == 0
    assert client.zcard(keys.SLOTS) == 0 and not client.hgetall(keys.PURGED_BOOKINGS)
    store.clear_posting(late)  # sent again after a lost reply: nothing given back twice
    assert float(client.hget(today, "spent")) == 0


def test_a_purged_unknown_post_refused_late_gives_back_its_spend(make_pipeline, tmp_path):
    """The job had failed "outcome unknown" (its estimate booked as spent)
    before `vidq purge --force`; its POST is then refused. Kept, the job would
    have been revived and the spend given back; purged, the spend stayed
    (review 91)."""
    from producer.purging import run_purge
    from worker.jobs import Job

    pipeline = make_pipeline()
    admission, store, client = pipeline.admission, pipeline.store, pipeline.store.redis
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["unknown, then refused"]), "u")
    admission.set_cap(1)
    [(ref, _)] = admission.pump()
    client.hset(keys.job(ref), mapping={"posting_at": "1.5", "posting_op": "op-7",
                                        "outcome_unknown": "1"})
    each = float(client.hget(keys.job(ref), "credits_pending"))
    assert admission.settle(ref, "failed")  # as Steps.fail books an unknown POST
    today = keys.spend_day(int(client.time()[0]) // 86400)
    assert float(client.hget(today, "spent")) == each

    run_purge(admission, pipeline.settings, "u", force=True, echo=lambda _: None)
    store.clear_posting(Job(batch="u", id=ref.split(":")[1], request={}, state=State.QUEUED,
                            extra={"posting_op": "op-7"}))

    assert float(client.hget(today, "spent")) == 0
    assert float(client.hget(today, "committed")) == 0


@pytest.mark.slow
def test_a_purged_posts_late_id_never_lands_in_a_job_enqueued_again_under_its_name(
        proxied, make_sandbox, tmp_path):
    """`vidq purge --force` while a named job's POST is out; the user enqueues a
    new prompt under the same id; then the old POST answers. Its id went to
    the new job by name: "done", with the old prompt's video under the new
    prompt's sidecar, and the new prompt never POSTed (review 95)."""
    sandbox = make_sandbox()
    pipeline, proxy = proxied(sandbox, VIDQ_MAX_IN_FLIGHT="2", VIDQ_POST_DEADLINE_S="20",
                              VIDQ_STEP_GRACE_S="40", VIDQ_HTTP_TIMEOUT_S="30")
    # The answer trickles in slowly until the purge and the re-enqueue have
    # run, however slowly `vidq purge` starts (a fixed 6 s could be outrun).
    proxy.trickle_interval_s = 0.25
    proxy.queue("trickle", count=1, method="POST")
    pipeline.start_workers(concurrency=2)

    def named(name: str, prompt: str) -> Path:
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps({"id": "shot-1", "prompt": prompt}) + "\n")
        return path

    pipeline.enqueue(named("old", "OLD: a red fox"), "night")
    client = pipeline.store.redis
    wait_until(lambda: client.hget(keys.job("night:shot-1"), "posting_at"), 30, "the marker")
    assert _vidq(pipeline, "purge", "night", "--force").returncode == 0
    pipeline.enqueue(named("new", "NEW: a blue whale"), "night")
    proxy.trickle_interval_s = 0.001

    assert pipeline.wait_finished("night", timeout_s=60)["done"] == 1
    wait_until(lambda: len(pipeline.ledger()) == 2 and client.hlen(keys.ORPHANS) == 1, 30,
               "the old POST's answer")
    by_prompt = {entry["prompt"]: entry for entry in pipeline.ledger()}
    assert sorted(by_prompt) == ["NEW: a blue whale", "OLD: a red fox"]
    video = (tmp_path / "videos" / "night" / "shot-1.mp4").read_bytes()
    assert hashlib.sha256(video).hexdigest() == by_prompt["NEW: a blue whale"]["sha256"]
    assert by_prompt["OLD: a red fox"]["id"] in client.hkeys(keys.ORPHANS)
    pipeline.stop_workers()
