"""Redis unreachable at the worst moment of a submit (review 22): the "POST
started" marker written, its reply lost, Redis not back at once. A real
Redis behind a proxy that resets the connection after Redis ran the command
(tests/chaos/redis_lost_reply.py); the sandbox over HTTP."""
from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

import pytest
from chaos.redis_lost_reply import LostReplyProxy
from conftest import wait_until, write_prompts
from test_lost_replies import _run_of
from test_steps import _admit_one, _run, steps_for  # noqa: F401 - fixture

from worker import keys, tasks
from worker.jobs import load_script
from worker.marker import mark_posting


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


def _lose_clear_replies(steps, proxy) -> None:
    """Lose the replies to every clear of a marker (redis-py's re-send
    included) until `del steps.store.clear_posting`: Redis ran it, the worker
    never hears."""
    real_clear = steps.store.clear_posting
    pattern = _run_of(steps.store._scripts["clear_posting"])

    def clear_unanswered(*args):
        proxy.arm(pattern, then=lambda: proxy.arm(pattern))
        return real_clear(*args)

    steps.store.clear_posting = clear_unanswered


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


def test_a_marker_left_unconfirmed_is_cleared_and_the_next_try_posts_once(
        steps_for, redis_url, make_sandbox):  # noqa: F811
    """No patience left in the step's lease: the try gives up before its POST
    and clears its marker (nothing was sent); the next try POSTs once."""
    sandbox = make_sandbox()
    steps, proxy = _through_proxy(steps_for, redis_url, sandbox, VIDQ_STEP_GRACE_S="10.5",
                                  VIDQ_POST_DEADLINE_S="5")  # 0.5 s of patience
    ref, token = _admit_one(steps)
    _lose_marker_replies(steps, proxy, times=100)  # every answer to the marker lost

    tasks._run(steps, "submit", steps.claim(ref, token, "submit"))
    proxy.arm(b"nothing matches this")  # Redis answers again
    given_up = steps.store.get(ref)
    step, _, token = steps.sent[-1]
    record = _run(steps, step, ref, token)

    assert proxy.lost > 1 and step == "submit" and not given_up.extra.get("posting_at")
    assert sandbox.stats()["submissions"] == 1
    assert record.generation_id and record.state == "submitted"
    assert steps.store.outcome_unknown("b") == 0


def test_a_marker_redis_never_answered_for_is_taken_over_by_the_next_try(
        steps_for, redis_url, make_sandbox, monkeypatch):  # noqa: F811
    """Redis answered neither the marker within the step's patience nor its
    clear within OUTAGE_PATIENCE_S (none here; the clear ran, its answers were
    lost): the try gives up before its POST and names its marker; the next
    try may take that marker over, and POSTs once."""
    from worker import marker

    monkeypatch.setattr(marker, "OUTAGE_PATIENCE_S", 0.0)
    sandbox = make_sandbox()
    steps, proxy = _through_proxy(steps_for, redis_url, sandbox, VIDQ_STEP_GRACE_S="10.5",
                                  VIDQ_POST_DEADLINE_S="5")  # 0.5 s of patience
    ref, token = _admit_one(steps)
    _lose_marker_replies(steps, proxy, times=100)
    _lose_clear_replies(steps, proxy)  # the clear's answers are lost too
    tasks._run(steps, "submit", steps.claim(ref, token, "submit"))
    proxy.arm(b"nothing matches this")
    del steps.store.clear_posting
    given_up = steps.store.get(ref)
    step, _, token = steps.sent[-1]
    record = _run(steps, step, ref, token)

    assert "marker's answer was lost" in given_up.last_error
    assert given_up.extra.get("unconfirmed_op") == given_up.extra.get("posting_op")
    assert sandbox.stats()["submissions"] == 1
    assert record.generation_id and record.state == "submitted"
    assert steps.store.outcome_unknown("b") == 0


def test_redis_away_past_the_steps_patience_is_waited_out_and_the_job_posts_once(
        steps_for, redis_url, make_sandbox):  # noqa: F811
    """Redis ran the marker, then stayed unreachable well past the step's
    patience (a restart loading a big AOF): the retry that names the marker
    cannot be written either. The worker waits for Redis, clears its marker
    (nothing was sent), and the next try POSTs once: not "outcome unknown"
    with nothing sent, its slot held."""
    sandbox = make_sandbox()
    steps, proxy = _through_proxy(steps_for, redis_url, sandbox, VIDQ_STEP_GRACE_S="10.5",
                                  VIDQ_POST_DEADLINE_S="5")  # 0.5 s of patience
    ref, token = _admit_one(steps)
    proxy.arm(_run_of(steps.store._scripts["mark_posting"]), then=lambda: proxy.down_for(3))

    started = time.monotonic()
    tasks._run(steps, "submit", steps.claim(ref, token, "submit"))
    waited = time.monotonic() - started
    withdrawn = steps.store.get(ref)
    step, _, token = steps.sent[-1]
    record = _run(steps, step, ref, token)

    assert waited > 2.5 and proxy.lost == 1
    assert step == "submit" and not withdrawn.extra.get("posting_at")
    assert record.generation_id and record.state == "submitted", record.last_error
    assert sandbox.stats()["submissions"] == 1
    assert steps.store.outcome_unknown("b") == 0


def test_a_job_taken_over_while_redis_was_away_is_revived_and_posts_once(
        steps_for, redis_url, make_sandbox):  # noqa: F811
    """As above, and while worker A could not reach Redis, worker B recovered the
    job and found A's marker: "outcome unknown". Once Redis answers A, A
    clears its own marker (it sent nothing), so the job goes back in line and is
    POSTed once."""
    sandbox = make_sandbox()
    steps_a, proxy = _through_proxy(steps_for, redis_url, sandbox, VIDQ_STEP_GRACE_S="10.5",
                                    VIDQ_POST_DEADLINE_S="5")  # 0.5 s of patience
    steps_b = steps_for(sandbox)
    ref, token = _admit_one(steps_a)
    proxy.arm(_run_of(steps_a.store._scripts["mark_posting"]), then=lambda: proxy.down_for(4))
    worker_a = threading.Thread(target=tasks._run, args=(steps_a, "submit",
                                                         steps_a.claim(ref, token, "submit")))
    worker_a.start()
    wait_until(lambda: steps_b.store.get(ref).extra.get("posting_at"), timeout_s=10)
    recovered = steps_b.store.transition(steps_b.store.get(ref), next_step="submit",
                                         due_in_s=1.0, recovered="1")
    tasks._run(steps_b, "submit", steps_b.claim(ref, recovered, "submit"))
    taken_over = steps_b.store.get(ref)
    worker_a.join(30)
    resent = [token for step, job_ref, token in steps_a.sent if job_ref == ref]
    tasks._run(steps_b, "submit", steps_b.claim(ref, resent[-1], "submit"))

    assert not worker_a.is_alive()
    assert taken_over.state == "failed" and "outcome_unknown" in taken_over.last_error
    paid = steps_b.store.get(ref)
    assert (paid.state, bool(paid.generation_id)) == ("submitted", True), paid.last_error
    assert sandbox.stats()["submissions"] == 1
    assert steps_b.store.outcome_unknown("b") == 0


@pytest.mark.slow
def test_a_worker_frozen_between_its_marker_and_its_post_never_passes_c(
        make_pipeline, make_sandbox, redis_url, tmp_path):
    """Worker 0's process group is stopped (SIGSTOP: a paused VM, a swap storm)
    between its POST marker and its POST (right after Redis answered the last
    call before the send), for longer than the slot hold of the "outcome
    unknown" that another worker then books for the job. Woken, it must not
    send that POST: C would be passed. Nothing is paid twice, every job ends
    done, and never more than C generations run at once."""
    sandbox = make_sandbox(time_scale=15, max_concurrency=100)  # ~6 s generations
    env = {"VIDQ_MAX_IN_FLIGHT": "2", "VIDQ_DEADLINE_S": "8"}  # the hold before a fit
    url = urlsplit(redis_url)
    proxy = LostReplyProxy(url.hostname, url.port)
    frozen = make_pipeline(sandbox, VIDQ_REDIS_URL=f"redis://127.0.0.1:{proxy.port}{url.path}",
                           **env)
    healthy = make_pipeline(sandbox, **env)
    healthy.log_dir = tmp_path / "healthy"
    healthy.log_dir.mkdir()
    frozen.start_workers(concurrency=2)
    victim = frozen.processes[0]
    last_call_before_the_post = b"EVALSHA\r\n$40\r\n" + load_script(
        frozen.store.redis, "open_post").sha.encode()

    def freeze() -> None:
        os.killpg(victim.pid, signal.SIGSTOP)
        # Woken mid-generation of the job given the slot once the hold ended.
        threading.Timer(13, os.killpg, (victim.pid, signal.SIGCONT)).start()

    proxy.after_reply(last_call_before_the_post, freeze)
    prompts = [f"a frozen night, take {i}" for i in range(10)]
    frozen.enqueue(write_prompts(tmp_path / "p.txt", prompts), "f")
    wait_until(lambda: proxy._after is None, 30, "worker 0's first marker")
    healthy.start_workers(concurrency=2)

    assert healthy.wait_finished("f", timeout_s=120)["done"] == len(prompts)
    assert Counter(entry["prompt"] for entry in healthy.ledger()) == {p: 1 for p in prompts}
    assert sandbox.stats()["max_in_flight"] == 2


def test_a_try_that_gives_up_after_an_earlier_unanswered_post_ends_outcome_unknown(
        steps_for, redis_url, make_sandbox):  # noqa: F811
    """An earlier try's POST went out and its worker died before the answer was
    recorded; the re-sent submit's own marker gets no answer (Redis out) on its
    last allowed attempt. The job must end outcome unknown with its slot held,
    not fail as a plain error with its slot freed while that POST generates:
    the next job would pass C = 1 (review 25)."""
    from worker.recovery import _resend

    sandbox = make_sandbox(mean_generation_s=600.0)
    steps, proxy = _through_proxy(steps_for, redis_url, sandbox, VIDQ_STEP_GRACE_S="10.5",
                                  VIDQ_POST_DEADLINE_S="5")
    steps.admission.set_cap(1)
    ref, token = _admit_one(steps)
    steps.store.redis.hset(keys.job(ref), "attempts", 7)  # earlier tries met 503s
    job = steps.claim(ref, token, "submit")
    assert mark_posting(steps.store, job, steps.durability) == "ok"
    steps.client.submit(job.request)  # sent; its worker dies before the answer is read
    assert _resend(steps.admission, steps.dispatch, 5.0, ref) == 1
    step, _, token = steps.sent[-1]
    _lose_marker_replies(steps, proxy, times=100)

    tasks._run(steps, step, steps.claim(ref, token, step))
    proxy.arm(b"nothing matches this")
    # Its own marker was never written (the earlier one stands): nothing to
    # clear, and the next try finds the earlier marker.
    step, _, token = steps.sent[-1]
    tasks._run(steps, step, steps.claim(ref, token, step))

    record = steps.store.get(ref)
    assert record.state == "failed" and record.extra.get("outcome_unknown") == "1"
    assert steps.admission.in_flight() == 1
    steps.admission.enqueue("b", [("j2", {"model": "alibaba/wan2.1-t2v-turbo", "prompt": "two"})],
                            time.time())
    assert steps.admission.pump() == []  # the slot is still taken
