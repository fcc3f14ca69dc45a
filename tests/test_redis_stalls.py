"""Redis unreachable at the worst moment of a submit (review 22): the "POST
started" marker written, its reply lost, Redis not back at once. A real
Redis behind a proxy that resets the connection after Redis ran the command
(tests/chaos/redis_lost_reply.py); the sandbox over HTTP."""
from __future__ import annotations

from urllib.parse import urlsplit

from chaos.redis_lost_reply import LostReplyProxy
from test_lost_replies import _run_of
from test_steps import _admit_one, _run, steps_for  # noqa: F401 - fixture

from worker import tasks


def _through_proxy(steps_for, redis_url, sandbox, **env):  # noqa: F811
    url = urlsplit(redis_url)
    proxy = LostReplyProxy(url.hostname, url.port)
    steps = steps_for(sandbox, VIDQ_REDIS_URL=f"redis://127.0.0.1:{proxy.port}{url.path}", **env)
    for script in [*steps.store._scripts.values(), *steps.admission._scripts.values()]:
        steps.store.redis.script_load(getattr(script, "_script", script).script)
    return steps, proxy


def _lose_marker_replies(steps, proxy, times: int) -> None:
    """Lose the reply to the marker's next `times` sends (redis-py's own
    re-send included): Redis ran it, the worker never hears."""
    pattern = _run_of(steps.store._scripts["mark_posting"])
    left = [times - 1]

    def again() -> None:
        if left[0] > 0:
            left[0] -= 1
            proxy.arm(pattern, then=again)

    proxy.arm(pattern, then=again)


def test_a_marker_sent_again_within_the_steps_lease_posts_once(
        steps_for, redis_url, make_sandbox):  # noqa: F811
    """Redis ran the marker, and its answer, and redis-py's re-send's, were
    lost (Redis crashed, back a moment later): the same call is sent again
    until Redis answers, and the job is POSTed once, not failed "outcome
    unknown" with nothing sent."""
    sandbox = make_sandbox()
    steps, proxy = _through_proxy(steps_for, redis_url, sandbox, VIDQ_STEP_GRACE_S="20",
                                  VIDQ_POST_DEADLINE_S="4")  # 11 s of patience
    ref, token = _admit_one(steps)
    _lose_marker_replies(steps, proxy, times=2)

    record = _run(steps, "submit", ref, token)

    assert proxy.lost == 2
    assert record.generation_id and record.state == "submitted" and not record.last_error
    assert sandbox.stats()["submissions"] == 1


def test_a_marker_left_unconfirmed_is_taken_over_by_the_next_try(
        steps_for, redis_url, make_sandbox):  # noqa: F811
    """No patience left in the step's lease: the try gives up before its POST,
    and names its marker; the next try takes that marker over and POSTs once."""
    sandbox = make_sandbox()
    steps, proxy = _through_proxy(steps_for, redis_url, sandbox, VIDQ_STEP_GRACE_S="10.5",
                                  VIDQ_POST_DEADLINE_S="5")  # 0.5 s of patience
    ref, token = _admit_one(steps)
    _lose_marker_replies(steps, proxy, times=100)  # Redis out for longer

    tasks._run(steps, "submit", steps.claim(ref, token, "submit"))
    proxy.arm(b"nothing matches this")  # Redis back
    given_up = steps.store.get(ref)
    step, _, token = steps.sent[-1]
    record = _run(steps, step, ref, token)

    assert given_up.extra.get("posting_at") and "marker's answer was lost" in given_up.last_error
    assert sandbox.stats()["submissions"] == 1
    assert record.generation_id and record.state == "submitted"
    assert steps.store.outcome_unknown("b") == 0
