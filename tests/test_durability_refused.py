"""A wait Redis refuses after the worker probed it: on Redis >= 7.2, AOF turned off
at runtime (`CONFIG SET appendonly no`) makes WAITAOF an error, while the worker's
last probe says WAITAOF. This Redis (6.2) refuses WAITAOF outright, so a probe
result set to WAITAOF stands for that stale probe, answered by a real server.
The steps of a worker driven by hand against the sandbox over HTTP."""
from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest
from conftest import wait_until
from test_steps import _admit_one, steps_for  # noqa: F401 - fixture

from worker import keys
from worker.marker import mark_posting
from worker.tasks import _run


def _status(redis_url: str) -> str:
    return subprocess.run(["vidq", "status", "b"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "VIDQ_REDIS_URL": redis_url}).stdout


def test_a_refused_wait_posts_nothing_spends_nothing_and_the_next_try_posts_once(
        steps_for, make_sandbox, redis_url):  # noqa: F811
    """The marker's WAITAOF is refused: the submit is not sent, the job keeps its
    slot, spends no attempt and tries again; the worker looks at Redis again, and
    the next try POSTs once and records the id. (The refusal was an unexpected
    error: an attempt spent, the marker left behind, and the next try ended the
    job "outcome unknown", holding its slot, with nothing ever POSTed.) `vidq status`
    says why POSTs wait, and stops saying it once a marker is durable again (it
    said it for 15 s after, while the next POST went out)."""
    sandbox = make_sandbox()
    steps = steps_for(sandbox)
    steps.durability.waitaof, steps.durability.probed_at = True, time.monotonic()
    ref, token = _admit_one(steps)

    _run(steps, "submit", steps.claim(ref, token, "submit"))
    waiting = steps.store.get(ref)
    resent = [token for step, job_ref, token in steps.sent if job_ref == ref]
    warned = _status(redis_url)

    assert sandbox.stats()["submissions"] == 0
    assert (waiting.state, waiting.attempts, waiting.step) == ("queued", 0, "submit")
    assert not waiting.extra.get("posting_at") and not waiting.last_error
    assert steps.durability.waitaof is False  # looked again
    assert resent, "the submit was not sent again"
    _run(steps, "submit", steps.claim(ref, resent[-1], "submit"))
    paid = steps.store.get(ref)
    assert paid.generation_id and paid.state == "submitted"
    assert sandbox.stats()["submissions"] == 1
    assert ("could not make the last POST marker durable (Redis refused the wait for the POST "
            "marker (unknown command") in warned, warned
    assert "durable" not in _status(redis_url)



@pytest.fixture
def back_later(restartable_redis):
    """back_later(s): the stopped Redis starts again s seconds later. Waited for
    before the fixture's Redis is stopped, so no server outlives the test."""
    timers: list[threading.Timer] = []

    def schedule(delay_s: float) -> None:
        timers.append(threading.Timer(delay_s, restartable_redis.start))
        timers[-1].start()

    yield schedule
    for timer in timers:
        timer.join()


def _redis_lost_during(restartable_redis, back_later, call, down_s):
    """`call`, its first run while the Redis is down: back `down_s` later (0: at
    once after the call)."""
    first = [True]

    def lost(*args):
        if not first or not first.pop():
            return call(*args)  # sent again: Redis is back, or coming back
        restartable_redis.stop()
        if down_s:
            back_later(down_s)
            return call(*args)
        try:
            return call(*args)
        finally:
            restartable_redis.start()
    return lost


@pytest.mark.parametrize("moment, down_s", [("reading Redis again", 0.0),
                                            ("reading Redis again", 1.0),
                                            ("clearing the marker", 0.0)])
@pytest.mark.slow
def test_redis_lost_while_a_refused_marker_is_handled_is_no_outcome_unknown(
        steps_for, make_sandbox, restartable_redis, back_later, moment, down_s):  # noqa: F811
    """The marker's wait is refused, and Redis is lost at the moment the worker reads
    its settings again, or clears the marker. Nothing was sent after the marker: the
    marker is cleared once Redis is back, and the next try POSTs once, the id
    recorded. (The lost connection was an unexpected error: the marker stayed, and
    the next try ended the job "outcome unknown", its slot held, nothing POSTed.)"""
    sandbox = make_sandbox()
    steps = steps_for(sandbox, VIDQ_REDIS_URL=restartable_redis.url)
    steps.durability.waitaof, steps.durability.probed_at = True, time.monotonic()
    owner, name = ((steps.durability, "refresh") if moment == "reading Redis again"
                   else (steps.store, "clear_posting"))
    real = getattr(owner, name)
    setattr(owner, name, _redis_lost_during(restartable_redis, back_later, real, down_s))
    ref, token = _admit_one(steps)
    _run(steps, "submit", steps.claim(ref, token, "submit"))
    setattr(owner, name, real)
    for _ in range(3):  # a try after the loss may meet the refused wait again
        if steps.store.get(ref).state != "queued":
            break
        resent = [token for step, job_ref, token in steps.sent if job_ref == ref][-1]
        _run(steps, "submit", steps.claim(ref, resent, "submit"))

    paid = steps.store.get(ref)
    assert (paid.state, bool(paid.generation_id)) == ("submitted", True), paid.last_error
    assert sandbox.stats()["submissions"] == 1


def test_warning_stays_while_another_marker_is_not_checked(
        steps_for, make_sandbox):  # noqa: F811
    """Job A's marker is not durable (the warning is set); job B's marker call finds
    an earlier marker of its own ("posted_before": no wait checked). The warning
    stays: only a marker found durable ends it."""
    steps = steps_for(make_sandbox())
    steps.durability.waitaof, steps.durability.probed_at = True, time.monotonic()
    first, token = _admit_one(steps, job_id="a")
    _run(steps, "submit", steps.claim(first, token, "submit"))
    second, token = _admit_one(steps, prompt="another boat", job_id="b")
    steps.store.redis.hset(keys.job(second), mapping={"posting_at": "1.0", "posting_op": "old"})
    steps.durability.waitaof, steps.durability.probed_at = True, time.monotonic()

    answer = mark_posting(steps.store, steps.claim(second, token, "submit"), steps.durability)

    assert answer == "posted_before"
    assert "Redis refused the wait" in steps.store.redis.get(keys.MARKER_NOT_DURABLE)


@pytest.mark.parametrize("redis_down_s", [0.0, 1.5])
def test_a_worker_that_stood_still_before_its_marker_was_checked_revives_the_job(
        steps_for, make_sandbox, restartable_redis, back_later, redis_down_s):  # noqa: F811
    """Worker A writes the marker and stands still (SIGSTOP, a paused VM) before its
    wait is looked at; the job is recovered, and worker B finds A's marker: "outcome
    unknown", its slot held. A resumes past its patience (2 s), and Redis is down for
    `redis_down_s` as it does: the wait was refused, nothing was sent, A clears its
    own marker, so the job goes back in line and is POSTed once (it stayed failed
    "outcome unknown", never POSTed; with Redis down, the clear got no patience)."""
    sandbox = make_sandbox()
    steps_a = steps_for(sandbox, VIDQ_REDIS_URL=restartable_redis.url, VIDQ_STEP_GRACE_S="10",
                        VIDQ_POST_DEADLINE_S="3")
    # B takes a missing beat for a dead sender once Redis has run for a heartbeat's
    # lifetime (0.9 s here): before that, a live sender may not have beaten yet.
    steps_b = steps_for(sandbox, VIDQ_REDIS_URL=restartable_redis.url,
                        VIDQ_HEARTBEAT_INTERVAL_S="0.3")
    wait_until(lambda: steps_b.store.redis.info("server")["uptime_in_seconds"] >= 1, 5,
               "Redis up for a second")
    steps_a.durability.waitaof, steps_a.durability.probed_at = True, time.monotonic()
    ref, token = _admit_one(steps_a)
    standing, resume = threading.Event(), threading.Event()
    real_check = steps_a.durability.check

    def stands_still_first(waits):
        standing.set()
        resume.wait(30)
        time.sleep(steps_a.settings.marker_patience_s + 0.2)
        if redis_down_s:
            restartable_redis.stop()
            back_later(redis_down_s)
        return real_check(waits)

    steps_a.durability.check = stands_still_first
    worker_a = threading.Thread(target=_run, args=(steps_a, "submit",
                                                   steps_a.claim(ref, token, "submit")))
    worker_a.start()
    assert standing.wait(10)
    recovered = steps_b.store.transition(steps_b.store.get(ref), next_step="submit",
                                         due_in_s=1.0, recovered="1")
    _run(steps_b, "submit", steps_b.claim(ref, recovered, "submit"))
    taken_over = steps_b.store.get(ref)
    resume.set()
    worker_a.join(30)
    # Revived, it is admitted again at once: its submit went out through A.
    resent = [token for step, job_ref, token in steps_a.sent if job_ref == ref]
    _run(steps_b, "submit", steps_b.claim(ref, resent[-1], "submit"))

    assert taken_over.state == "failed" and "outcome_unknown" in taken_over.last_error
    paid = steps_b.store.get(ref)
    assert (paid.state, bool(paid.generation_id)) == ("submitted", True), paid.last_error
    assert sandbox.stats()["submissions"] == 1
