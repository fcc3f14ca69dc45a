"""Per-batch admission: round-robin, priorities, pause/resume, cancel, spend caps.

Real Redis, real `celery -A worker worker` processes and the sandbox over
HTTP; the order of POSTs is read from the sandbox's ledger.
"""
from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest
from conftest import wait_until, write_prompts

from worker import keys
from worker.batch_control import admission_state, pause
from worker.spend import spend_summary


def _posted_batches(pipeline) -> str:
    """The batch letter of every POST the sandbox saw, in the order it saw them."""
    entries = sorted(pipeline.ledger(), key=lambda entry: entry["submitted_at"])
    return "".join(entry["prompt"][0] for entry in entries)


def _prompts(letter: str, count: int) -> list[str]:
    return [f"{letter} prompt {i}" for i in range(count)]


def _vidq(pipeline, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["vidq", *args], env=pipeline.env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.slow
def test_two_batches_share_one_slot_round_robin(make_pipeline, tmp_path):
    """A batch enqueued after a bigger one is served every other turn, not after it."""
    pipeline = make_pipeline(VIDQ_MAX_IN_FLIGHT=1)
    pipeline.enqueue(write_prompts(tmp_path / "a.txt", _prompts("A", 6)), "first")
    pipeline.enqueue(write_prompts(tmp_path / "b.txt", _prompts("B", 3)), "second")

    pipeline.start_workers(count=1, concurrency=2)
    pipeline.wait_finished("first", timeout_s=120)
    pipeline.wait_finished("second", timeout_s=60)

    assert _posted_batches(pipeline) == "ABABABAAA"


@pytest.mark.slow
def test_a_batch_enqueued_while_another_runs_gets_every_other_slot(make_pipeline, make_sandbox,
                                                                    tmp_path):
    """Workers busy with batch A's backlog at C=2: batch B's jobs start within its next turns."""
    pipeline = make_pipeline(make_sandbox(time_scale=30), VIDQ_MAX_IN_FLIGHT=2,
                             VIDQ_EXPECTED_GENERATION_S=3)
    pipeline.start_workers(count=1, concurrency=2)
    pipeline.enqueue(write_prompts(tmp_path / "a.txt", _prompts("A", 8)), "running")
    pipeline.enqueue(write_prompts(tmp_path / "b.txt", _prompts("B", 3)), "later")

    pipeline.wait_finished("later", timeout_s=90)
    order = _posted_batches(pipeline)

    # Behind A's backlog B would be POSTs 9-11; sharing the slots, B is among the first 8.
    assert sorted(i for i, letter in enumerate(order) if letter == "B")[-1] <= 7, order
    assert "BB" not in order, order


@pytest.mark.slow
def test_a_high_priority_batch_enqueued_later_is_admitted_first(make_pipeline, tmp_path):
    """`--priority high` jumps a normal batch that was enqueued before it."""
    pipeline = make_pipeline(VIDQ_MAX_IN_FLIGHT=1)
    pipeline.enqueue(write_prompts(tmp_path / "n.txt", _prompts("N", 3)), "bulk")
    result = _vidq(pipeline, "enqueue", str(write_prompts(tmp_path / "h.txt", _prompts("H", 2))),
                   "--batch", "urgent", "--priority", "high")
    assert result.returncode == 0, result.stderr

    pipeline.start_workers(count=1, concurrency=2)
    pipeline.wait_finished("bulk", timeout_s=120)

    assert _posted_batches(pipeline) == "HHNNN"


@pytest.mark.slow
def test_pause_stops_admission_and_resume_restarts_it(make_pipeline, make_sandbox, tmp_path):
    """A paused batch's job in flight finishes; the waiting ones are not POSTed until resume."""
    pipeline = make_pipeline(make_sandbox(time_scale=30), VIDQ_MAX_IN_FLIGHT=1,
                             VIDQ_EXPECTED_GENERATION_S=3)
    pipeline.start_workers(count=1, concurrency=2)
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", _prompts("P", 3)), "night")
    wait_until(lambda: pipeline.ledger(), what="first POST")

    assert pause(pipeline.admission, "night") == 2
    wait_until(lambda: pipeline.store.counts("night")["done"] == 1, what="the job in flight done")
    time.sleep(2.0)  # a few reconciler passes: none may admit a paused batch
    assert len(pipeline.ledger()) == 1
    assert pipeline.store.counts("night")["queued"] == 2
    assert admission_state(pipeline.admission, "night") == "paused"

    result = _vidq(pipeline, "resume", "night")
    counts = pipeline.wait_finished("night", timeout_s=60)

    assert result.returncode == 0 and "2 jobs waiting" in result.stdout, result
    assert counts["done"] == 3 and len(pipeline.ledger()) == 3


def test_cancel_ends_waiting_jobs_and_downloads_those_in_flight(make_pipeline, make_sandbox,
                                                                tmp_path):
    """Cancelled jobs are never POSTed; generations in flight end done, files on disk."""
    pipeline = make_pipeline(make_sandbox(time_scale=30), VIDQ_MAX_IN_FLIGHT=2,
                             VIDQ_EXPECTED_GENERATION_S=3)
    pipeline.start_workers(count=1, concurrency=2)
    # Polls held until the cancel has run: a ~3 s generation found done
    # first would free its slot for a third job while `vidq cancel` starts up
    # on a loaded machine (+3 s before the cancel failed the test).
    pipeline.store.pause_polls(120)
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", _prompts("C", 6)), "doomed")
    wait_until(lambda: len(pipeline.ledger()) == 2, what="two POSTs")

    result = _vidq(pipeline, "cancel", "doomed")
    pipeline.store.redis.delete(keys.PAUSE_POLL)
    wait_until(lambda: pipeline.store.counts("doomed")["done"] == 2, timeout_s=60,
          what="in-flight jobs done")
    time.sleep(1.5)

    assert result.returncode == 0, result.stderr
    assert "4 waiting jobs cancelled; 2 jobs in flight finish" in result.stdout
    counts = pipeline.store.counts("doomed")
    assert counts["cancelled"] == 4 and counts["done"] == 2 and counts["queued"] == 0
    ledger = pipeline.ledger()
    assert len(ledger) == 2
    videos = Path(pipeline.settings.storage_url.removeprefix("file://")) / "doomed"
    stored = {hashlib.sha256(path.read_bytes()).hexdigest() for path in videos.glob("*.mp4")}
    assert stored == {entry["sha256"] for entry in ledger}
    unknown = _vidq(pipeline, "cancel", "no-such-batch")
    assert unknown.returncode == 2 and unknown.stderr == "error: no batch named 'no-such-batch'\n"


def test_max_videos_stops_admission_at_the_limit_and_raising_it_resumes(make_pipeline,
                                                                        tmp_path):
    """At --max-videos 2 exactly two are POSTed and the batch shows `paused: spend cap`."""
    pipeline = make_pipeline(VIDQ_MAX_IN_FLIGHT=4)
    pipeline.start_workers(count=1, concurrency=2)
    enqueued = _vidq(pipeline, "enqueue", str(write_prompts(tmp_path / "p.txt", _prompts("V", 5))),
                     "--batch", "capped", "--max-videos", "2")
    assert enqueued.returncode == 0, enqueued.stderr
    wait_until(lambda: pipeline.store.counts("capped")["done"] == 2, what="two done")
    time.sleep(1.5)

    assert len(pipeline.ledger()) == 2
    assert admission_state(pipeline.admission, "capped") == "paused: spend cap"
    shown = _vidq(pipeline, "limits", "capped")
    assert "paused: spend cap" in shown.stdout and "240,000 credits spent" in shown.stdout

    raised = _vidq(pipeline, "limits", "capped", "--max-videos", "4")
    wait_until(lambda: pipeline.store.counts("capped")["done"] == 4, what="four done")
    time.sleep(1.5)

    assert raised.returncode == 0, raised.stderr
    assert len(pipeline.ledger()) == 4 and pipeline.store.counts("capped")["queued"] == 1
    spend = spend_summary(pipeline.store.redis, "capped")["batch"]
    assert spend["spent"] == 4 * 120000 and spend["committed"] == 0 and spend["videos"] == 4


def test_daily_credit_cap_stops_every_batch_and_raising_it_resumes(make_pipeline, tmp_path):
    """A daily cap of 2 videos' credits admits two jobs in all, then two more when raised;
    a batch enqueued meanwhile is told it waits."""
    pipeline = make_pipeline(VIDQ_MAX_IN_FLIGHT=4)
    assert _vidq(pipeline, "limits", "--daily-credits", "240000").returncode == 0
    pipeline.start_workers(count=1, concurrency=2)
    pipeline.enqueue(write_prompts(tmp_path / "a.txt", _prompts("D", 3)), "day-a")
    pipeline.enqueue(write_prompts(tmp_path / "b.txt", _prompts("E", 3)), "day-b")
    wait_until(lambda: sum(pipeline.store.counts(b)["done"] for b in ("day-a", "day-b")) == 2,
          what="two done")
    time.sleep(1.5)
    assert len(pipeline.ledger()) == 2
    assert admission_state(pipeline.admission, "day-b") == "paused: daily credit cap"
    late = _vidq(pipeline, "enqueue", str(write_prompts(tmp_path / "c.txt", ["F 0"])),
                 "--batch", "day-c")
    assert late.returncode == 0
    assert "daily credit cap is reached: the batch waits until 00:00 UTC" in late.stderr

    assert _vidq(pipeline, "limits", "--daily-credits", "480000").returncode == 0
    batches = ("day-a", "day-b", "day-c")
    wait_until(lambda: sum(pipeline.store.counts(b)["done"] for b in batches) == 4,
          what="four done")
    time.sleep(1.5)

    assert len(pipeline.ledger()) == 4
    today = spend_summary(pipeline.store.redis, "day-a")["today"]
    assert today["spent"] + today["committed"] <= 480000
    done = [pipeline.store.get(keys.job_ref(b, i)) for b in batches
            for i in pipeline.store.job_ids(b)]
    assert sorted(job.number("credits") for job in done if job.state == "done") == [120000.0] * 4


def test_the_daily_cap_warning_prices_the_jobs_that_wait(make_pipeline, tmp_path):
    """Deployment estimates of 60,000 credits for 480P and 300,000 for 720P (the
    default is 120,000) and a daily cap of 1,000,000. With 900,000 spent, a 480P
    batch fits and is not warned; with 800,000, a 720P batch does not, is told it
    waits for midnight, and `vidq status` says so. (Priced at the default, the
    first was warned for nothing and the second waited silently.)"""
    pipeline = make_pipeline(VIDQ_MAX_IN_FLIGHT=4, VIDQ_CREDIT_ESTIMATES=(
        "alibaba/wan2.1-t2v-turbo@480P=60000,alibaba/wan2.1-t2v-turbo@720P=300000"))
    pipeline.start_workers(count=1, concurrency=2)
    client = pipeline.store.redis
    wait_until(lambda: client.hexists(keys.CONFIG, "credit_estimate@alibaba/wan2.1-t2v-turbo"
                                      "@720P"), 30, "the workers' estimates")
    assert _vidq(pipeline, "limits", "--daily-credits", "1000000").returncode == 0
    today = keys.spend_day(int(client.time()[0]) // 86400)
    client.hset(today, "spent", 900000)

    cheap = _vidq(pipeline, "enqueue", str(write_prompts(tmp_path / "c.txt", ["cheap 0"])),
                  "--batch", "cheap", "--resolution", "480P")
    wait_until(lambda: pipeline.store.counts("cheap")["done"] == 1, 60, "the 480P video")
    client.hset(today, "spent", 800000)
    dear = _vidq(pipeline, "enqueue", str(write_prompts(tmp_path / "d.txt", ["dear 0"])),
                 "--batch", "dear", "--resolution", "720P")
    time.sleep(1.5)
    status = _vidq(pipeline, "status", "dear")

    assert cheap.returncode == 0 and "daily credit cap" not in cheap.stderr
    assert "daily credit cap is reached" in dear.stderr
    assert "paused: daily credit cap" in status.stdout
    assert [entry["prompt"] for entry in pipeline.ledger()] == ["cheap 0"]


def test_old_single_line_is_drained_into_batch_lines(make_pipeline, tmp_path):
    """Jobs waiting in a pre-upgrade `vidq:admission` list are admitted from their batch's line."""
    pipeline = make_pipeline()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", _prompts("O", 3)), "old")
    client = pipeline.store.redis
    ids = pipeline.store.job_ids("old")
    client.delete(keys.batch_line("old"), keys.ring("normal"))  # as an old enqueue left it
    client.hdel(keys.batch("old"), "in_ring")
    client.rpush(keys.ADMISSION, *[keys.job_ref("old", i) for i in ids])
    pipeline.admission.set_cap(2)

    admitted = pipeline.admission.pump()

    assert len(admitted) == 2 and client.llen(keys.ADMISSION) == 0
    assert pipeline.admission.waiting("old") == 1


def test_enqueue_into_a_cancelled_batch_is_refused(make_pipeline, tmp_path):
    """A cancelled batch takes no new jobs: one error line, exit 2, nothing
    written, and no plan printed first (helper 107)."""
    pipeline = make_pipeline()
    path = write_prompts(tmp_path / "p.txt", _prompts("X", 2))
    pipeline.enqueue(path, "gone")
    assert "2 waiting jobs cancelled" in _vidq(pipeline, "cancel", "gone").stdout

    more = write_prompts(tmp_path / "q.txt", _prompts("Y", 1))
    result = _vidq(pipeline, "enqueue", str(more), "--batch", "gone")

    assert result.returncode == 2
    assert result.stderr.strip() == ("error: batch 'gone' was cancelled: enqueue into a new "
                                     "batch name")
    assert result.stdout == ""
    assert pipeline.store.batch_total("gone") == 2



def test_a_job_put_back_keeps_its_place_in_its_batch(make_pipeline, tmp_path):
    """A job sent back by a 429, or retried after failing, is the batch's next admission."""
    pipeline = make_pipeline()
    store, admission = pipeline.store, pipeline.admission
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", _prompts("K", 4)), "keep")
    admission.set_cap(1)
    (first, _token), = admission.pump()
    assert store.get(first).extra["line"] == "1"

    store.back_in_line(store.get(first), 0.0, rate_limited=False)
    (again, _token), = admission.pump()
    store.transition(store.get(again), state="failed", release_slot=True, expected_token="*")
    (second, _token), = admission.pump()
    store.transition(store.get(second), state="done", release_slot=True, expected_token="*")
    assert admission.requeue_failed("keep") == {"requeued": 1, "not_failed": 3}
    (retried, _token), = admission.pump()

    assert again == first and store.get(second).extra["line"] == "2"
    assert retried == first and admission.waiting("keep") == 2


def test_a_job_admitted_but_not_yet_posted_when_cancelled_is_never_posted(make_pipeline,
                                                                          tmp_path):
    """Its submit task finds the batch cancelled: no POST, the job ends cancelled, slot freed."""
    from worker.tasks import dispatch

    pipeline = make_pipeline(VIDQ_MAX_IN_FLIGHT=2)
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", _prompts("L", 4)), "late")
    pipeline.admission.set_cap(2)
    admitted = pipeline.admission.pump()  # slots taken, submit tasks not sent yet
    result = _vidq(pipeline, "cancel", "late")
    assert "2 waiting jobs cancelled; 0 jobs in flight" in result.stdout, result

    pipeline.start_workers(count=1, concurrency=2)
    for ref, token in admitted:
        dispatch("submit", ref, token, 0)
    wait_until(lambda: pipeline.store.counts("late")["cancelled"] == 4, what="all cancelled")

    assert pipeline.ledger() == [] and pipeline.admission.in_flight() == 0
    spend = spend_summary(pipeline.store.redis, "late")["batch"]
    assert spend["committed"] == 0 and spend["videos"] == 0


def test_max_credits_counts_jobs_in_flight_and_raising_it_admits_more(make_pipeline,
                                                                      tmp_path):
    """At --max-credits 250,000 (120,000 a job) two are admitted, not three; 360,000 admits one more."""
    pipeline = make_pipeline()
    admission = pipeline.admission
    enqueued = _vidq(pipeline, "enqueue", str(write_prompts(tmp_path / "p.txt", _prompts("M", 5))),
                     "--batch", "budget", "--max-credits", "250000")
    assert enqueued.returncode == 0, enqueued.stderr
    admission.set_cap(4)

    first = admission.pump()
    shown = _vidq(pipeline, "limits", "budget")
    raised = _vidq(pipeline, "limits", "budget", "--max-credits", "360000")
    second = admission.pump()  # the CLI admitted the third already: nothing more fits

    assert len(first) == 2
    assert "(paused: spend cap)" in shown.stdout and "240,000 committed" in shown.stdout
    assert raised.returncode == 0 and second == []
    assert admission.in_flight() == 3 and admission.waiting("budget") == 2
    assert "360,000 committed" in raised.stdout and "(paused: spend cap)" in raised.stdout


def test_a_malformed_credit_estimate_is_one_error_line(make_pipeline):
    """VIDQ_CREDIT_ESTIMATES that is not model@RES=credits: exit 2, one line naming it."""
    pipeline = make_pipeline()
    pipeline.env["VIDQ_CREDIT_ESTIMATES"] = "alibaba/wan2.1-t2v-turbo=5"

    result = _vidq(pipeline, "limits")

    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("error: VIDQ_CREDIT_ESTIMATES: 'alibaba/wan2.1-t2v-turbo=5' is not "
                             "model@RESOLUTION=credits (e.g. alibaba/wan2.1-t2v-turbo@480P=60000)\n")


def test_the_estimate_per_model_and_resolution_is_what_a_cap_counts(make_pipeline, tmp_path):
    """480P estimated at 60,000: a 130,000 cap admits two jobs, where the default would admit one."""
    pipeline = make_pipeline()
    pipeline.env["VIDQ_CREDIT_ESTIMATES"] = "alibaba/wan2.1-t2v-turbo@480P=60000"
    path = write_prompts(tmp_path / "p.txt", _prompts("R", 3))
    enqueued = _vidq(pipeline, "enqueue", str(path), "--batch", "small", "--resolution", "480P",
                     "--max-credits", "130000")
    assert enqueued.returncode == 0, enqueued.stderr
    pipeline.admission.set_cap(4)

    admitted = pipeline.admission.pump()

    assert len(admitted) == 2
    assert {pipeline.store.get(ref).number("credits_pending") for ref, _ in admitted} == {60000.0}


def test_a_producers_lower_estimate_does_not_make_a_cap_count_less(make_pipeline, tmp_path):
    """Workers estimate 120,000 a video; a producer's shell says 1. Under
    --max-credits 120,000 one video is admitted, not all four: the caps count
    the deployment's estimate (a producer's may only be higher)."""
    pipeline = make_pipeline()
    pipeline.start_workers(count=1, concurrency=2)
    wait_until(lambda: pipeline.store.redis.hget(keys.CONFIG, "credit_estimate"),
               what="the workers' estimate in Redis")
    shell = {**pipeline.env, "VIDQ_CREDIT_ESTIMATE": "1"}
    path = write_prompts(tmp_path / "p.txt", _prompts("E", 4))
    enqueued = subprocess.run(["vidq", "enqueue", str(path), "--batch", "capped",
                               "--max-credits", "120000"], env=shell, capture_output=True,
                              text=True, timeout=60)
    assert enqueued.returncode == 0, enqueued.stderr

    wait_until(lambda: pipeline.store.counts("capped")["done"] >= 1, what="a video done")
    time.sleep(1.0)  # the reconciler pumps every second: time to admit more if it would

    assert len(pipeline.ledger()) == 1
    assert "(paused: spend cap)" in _vidq(pipeline, "limits", "capped").stdout
    assert pipeline.admission.waiting("capped") == 3
