"""A wait Redis refuses after the worker probed it: on Redis >= 7.2, AOF turned off
at runtime (`CONFIG SET appendonly no`) makes WAITAOF an error, while the worker's
last probe says WAITAOF. This Redis (6.2) refuses WAITAOF outright, so a probe
result set to WAITAOF stands for that stale probe, answered by a real server.
The steps of a worker driven by hand against the sandbox over HTTP."""
from __future__ import annotations

import os
import subprocess
import time

from test_steps import _admit_one, steps_for  # noqa: F401 - fixture

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

