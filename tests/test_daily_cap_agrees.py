"""What `vidq status`, `vidq enqueue` and Flower say of the daily credit cap is what
the pump (lua/pump.lua) does: both find the next job in turn and price it with the
same Lua (lua/line_lib.lua, lua/daily_cap.lua). Real Redis, the sandbox over HTTP,
real workers or a worker's steps driven by hand."""
from __future__ import annotations

import subprocess
import time

from conftest import wait_until, write_prompts
from test_break_flower_backlog import _rows
from test_steps import steps_for  # noqa: F401 - fixture

from producer.enqueue import enqueue_file
from worker import keys
from worker.batch_control import admission_state, set_daily_credits
from worker.flower_backlog import ROW_PREFIX, TOTAL_ROW
from worker.marker import mark_posting
from worker.retry import requeue
from worker.tasks import dispatch

MODEL = {"model": "alibaba/wan2.1-t2v-turbo"}


def _capped_pipeline(make_pipeline, cap: int):
    """C = `cap`; 60,000 credits a 480P video and 300,000 a 720P one, as the
    workers publish them; a daily cap of 200,000."""
    pipeline = make_pipeline(VIDQ_MAX_IN_FLIGHT=cap, VIDQ_CREDIT_ESTIMATES=(
        "alibaba/wan2.1-t2v-turbo@480P=60000,alibaba/wan2.1-t2v-turbo@720P=300000"))
    admission = pipeline.admission
    admission.publish_estimates(admission.credits)
    admission.set_cap(cap)
    set_daily_credits(admission, 200000.0)
    return pipeline, admission


def _vidq_enqueue(pipeline, path, batch: str, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(["vidq", "enqueue", str(path), "--batch", batch, *options],
                          env=pipeline.env, capture_output=True, text=True, timeout=60)


def test_a_batch_past_its_own_cap_is_passed_over_as_the_pump_does(make_pipeline, tmp_path):
    """C = 1, held by a 480P job (60,000 of a 200,000 daily cap). First in the ring, a
    720P batch (300,000) whose own max-credits (100,000) its job would pass; then a
    480P batch. The pump passes the first over (spend cap) and admits the second
    within the daily cap, so neither `vidq enqueue` nor status nor Flower may say
    "daily credit cap" (they priced the first batch's job, and said it, for as
    long as the slot was full)."""
    pipeline, admission = _capped_pipeline(make_pipeline, 1)
    enqueue_file(admission, write_prompts(tmp_path / "f.txt", ["filler"]), "filler",
                 {**MODEL, "resolution": "480P"}, dispatch)
    enqueue_file(admission, write_prompts(tmp_path / "d.txt", ["dear"]), "dear",
                 {**MODEL, "resolution": "720P"}, dispatch, batch_settings={"max_credits": 100000})
    cheap = _vidq_enqueue(pipeline, write_prompts(tmp_path / "c.txt", ["cheap"]), "cheap",
                          "--resolution", "480P")
    said = admission_state(admission, "cheap")
    rows = _rows(pipeline.settings.redis_url)
    pipeline.start_workers(count=1, concurrency=2)
    wait_until(lambda: pipeline.store.counts("cheap")["done"] == 1, 60, "the 480P video")

    assert cheap.returncode == 0 and "daily credit cap" not in cheap.stderr, cheap.stderr
    assert said == "open"
    assert rows == {TOTAL_ROW: 2, ROW_PREFIX + "dear": 1, ROW_PREFIX + "cheap": 1}
    assert sorted(entry["prompt"] for entry in pipeline.ledger()) == ["cheap", "filler"]


def test_a_line_head_paid_late_is_passed_over_as_the_pump_does(steps_for):  # noqa: F811
    """A job resubmitted after "outcome unknown" waits at the head of its line; its
    first POST's id then arrives late, so it runs upstream, still listed at the
    head. The pump passes over it and prices the next job; so must status. (It
    priced the paid job at 0 and said "open" while the pump admitted nothing for
    the daily cap.)"""
    steps = steps_for()
    admission, client = steps.admission, steps.store.redis
    admission.set_cap(2)
    admission.enqueue("x", [(name, {**MODEL, "prompt": name}) for name in ("j1", "j2", "j3")],
                      time.time())
    (ref, token), _ = admission.pump()
    job = steps.claim(ref, token, "submit")
    assert mark_posting(steps.store, job, steps.durability) == "ok"
    posting_op = job.extra["posting_op"]
    steps.fail(job, "outcome_unknown: the answer was lost")
    today = keys.spend_day(int(client.time()[0]) // 86400)
    used = sum(float(value or 0) for value in client.hmget(today, "committed", "spent"))
    set_daily_credits(admission, used + 60000)  # less than one job at the default estimate
    admission.set_cap(3)
    assert requeue(admission, steps.dispatch, "x", ["j1"], resubmit_unknown=True) == {
        "resubmitted": 1}
    late = steps.store.get(ref)
    late.extra["posting_op"] = posting_op
    steps.store.record_generation(late, "gen-late", 60.0, steps.durability)

    said = admission_state(admission, "x")
    admitted = admission.pump()

    assert admitted == []
    assert said == "paused: daily credit cap"


def test_a_batch_with_nothing_waiting_is_not_said_held(make_pipeline, tmp_path):
    """A daily cap of 200,000; a 720P batch (300,000) waits for it. A high-priority
    480P batch is enqueued and its one job admitted at once: nothing of it waits,
    so neither `vidq enqueue` nor status may say it waits for the daily cap."""
    pipeline, admission = _capped_pipeline(make_pipeline, 4)
    enqueue_file(admission, write_prompts(tmp_path / "d.txt", ["dear"]), "dear",
                 {**MODEL, "resolution": "720P"}, dispatch)
    cheap = _vidq_enqueue(pipeline, write_prompts(tmp_path / "c.txt", ["cheap"]), "cheap",
                          "--resolution", "480P", "--priority", "high")

    assert admission.waiting("cheap") == 0 and admission.waiting("dear") == 1
    assert cheap.returncode == 0 and "daily credit cap" not in cheap.stderr, cheap.stderr
    assert admission_state(admission, "cheap") == "open"
    assert admission_state(admission, "dear") == "paused: daily credit cap"
