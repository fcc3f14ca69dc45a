"""Redis away past a submit's patience, at the edges (review 74): a marker
request held up in the network that lands after its try gave up, a try that
took an earlier marker over and ran out of attempts, and a marker found not
durable whose clear meets the outage. Nothing was sent in any of them: one
POST in the end, or a plain failure, never "outcome unknown". A real Redis
behind tests/chaos/redis_lost_reply.py's proxy; the sandbox over HTTP; steps
driven by hand."""
from __future__ import annotations

import time

import pytest
import redis
from test_redis_stalls import _lose_clear_replies, _lose_marker_replies, _through_proxy
from test_steps import _admit_one, steps_for  # noqa: F401 - fixture

from worker import keys, marker, tasks
from worker.durability import NotDurable
from worker.job_rules import generation_hold_s
from worker.jobs import JobStore
from worker.recovery import _resend
from worker.upstream import UpstreamClient


def test_a_marker_that_lands_after_its_try_gave_up_is_taken_over_by_the_next_try(
        steps_for, redis_url, make_sandbox, monkeypatch):  # noqa: F811
    """The marker's request is held up in the network past the step's patience;
    the try clears (nothing there: 'not mine'), and the held request reaches
    Redis just after, written as the try's marker. The next try names that
    marker (it never POSTed), takes it over and POSTs once."""
    sandbox = make_sandbox()
    steps, _ = _through_proxy(steps_for, redis_url, sandbox, VIDQ_STEP_GRACE_S="10.5",
                              VIDQ_POST_DEADLINE_S="5")  # 0.5 s of patience
    direct = steps_for(sandbox)
    ref, token = _admit_one(steps)
    ops: list[str] = []
    real_op_id = marker.op_id
    monkeypatch.setattr(marker, "op_id", lambda: ops.append(real_op_id()) or ops[-1])
    real_run, real_clear = steps.store.run_with_waits, steps.store.clear_posting
    job = steps.claim(ref, token, "submit")
    landed = []

    def held_in_the_network(build):
        raise redis.ConnectionError("the marker's request is held up in the network")

    def clear_then_the_marker_lands(*args):
        mine = real_clear(*args)
        landed.append(direct.store.script("mark_posting")(
            keys=[keys.job(ref), keys.batch("b")], args=[job.token, ops[0], ""]))
        return mine

    steps.store.run_with_waits = held_in_the_network
    steps.store.clear_posting = clear_then_the_marker_lands
    tasks._run(steps, "submit", job)
    steps.store.run_with_waits, steps.store.clear_posting = real_run, real_clear
    step, _, token = steps.sent[-1]
    tasks._run(steps, step, steps.claim(ref, token, step))
    record = steps.store.get(ref)

    assert landed == ["ok"]
    assert record.generation_id and record.state == "submitted", record.last_error
    assert sandbox.stats()["submissions"] == 1


def test_a_takeover_try_out_of_attempts_fails_plainly_with_its_slot_freed(
        steps_for, redis_url, make_sandbox, monkeypatch):  # noqa: F811
    """An earlier try left its marker unconfirmed (it sent nothing; the record
    names it). This try, the job's last attempt, takes it over; every answer to
    its marker and to its clear is lost (OUTAGE_PATIENCE_S 0 here). It gives
    up: nobody sent anything, so the job fails plainly, its slot freed, not
    "outcome unknown" with its slot held for VIDQ_DEADLINE_S."""
    monkeypatch.setattr(marker, "OUTAGE_PATIENCE_S", 0.0)
    sandbox = make_sandbox()
    steps, proxy = _through_proxy(steps_for, redis_url, sandbox, VIDQ_STEP_GRACE_S="10.5",
                                  VIDQ_POST_DEADLINE_S="5")
    ref, token = _admit_one(steps)
    steps.store.redis.hset(keys.job(ref), mapping={
        "attempts": steps.settings.max_attempts - 1, "posting_at": repr(steps.store.now()),
        "posting_op": "e0e0e0e0", "unconfirmed_op": "e0e0e0e0"})
    _lose_marker_replies(steps, proxy, times=100)
    _lose_clear_replies(steps, proxy)
    tasks._run(steps, "submit", steps.claim(ref, token, "submit"))
    proxy.arm(b"nothing matches this")
    record = steps.store.get(ref)

    assert sandbox.stats()["submissions"] == 0
    assert record.state == "failed" and "gave up after" in record.last_error
    assert record.extra.get("outcome_unknown") != "1", record.last_error
    assert steps.admission.in_flight() == 0 and not steps.store.redis.zcard(keys.SLOT_HOLDS)


def test_a_marker_not_durable_whose_clear_meets_an_outage_posts_once(
        steps_for, redis_url, make_sandbox):  # noqa: F811
    """The marker answered, but its wait failed (an fsync stalled), and Redis
    went away for 3 s, past the 0.5 s patience, as the marker was cleared: the
    clear waits Redis out (nothing was sent) and the job is POSTed once, not
    failed "outcome unknown" by the recovered submit."""
    sandbox = make_sandbox()
    steps, proxy = _through_proxy(steps_for, redis_url, sandbox, VIDQ_STEP_GRACE_S="10.5",
                                  VIDQ_POST_DEADLINE_S="5")
    direct = steps_for(sandbox)
    ref, token = _admit_one(steps)
    real_check = steps.durability.check
    stalls = [True]

    def stalled(waits):
        if stalls and stalls.pop():
            proxy.down_for(3)
            raise NotDurable("WAITAOF: the POST marker was not fsynced in time")
        return real_check(waits)

    steps.durability.check = stalled
    tasks._run(steps, "submit", steps.claim(ref, token, "submit"))
    record = direct.store.get(ref)
    if record.extra.get("posting_at"):  # as before: the try could not hand on
        direct.store.redis.zadd(keys.DUE, {ref: 0})
        assert _resend(direct.admission, direct.dispatch, 5.0, ref) == 1
    step, _, token = (direct.sent or steps.sent)[-1]
    tasks._run(direct, step, direct.claim(ref, token, step))
    final = direct.store.get(ref)

    assert not record.extra.get("posting_at")
    assert final.generation_id and final.state == "submitted", final.last_error
    assert sandbox.stats()["submissions"] == 1


def test_a_try_whose_marker_never_lands_keeps_an_earlier_unposted_marker_takeable(
        steps_for, redis_url, make_sandbox):  # noqa: F811
    """An earlier try's marker stands, never POSTed (it landed after its clear),
    named for the next try to take over. This try's own marker request never
    reaches Redis: clearing only its own left the earlier one standing, and
    naming its own op for the next try made that try meet the earlier marker:
    "outcome unknown", nothing ever sent (review 75). Both go now; one POST."""
    sandbox = make_sandbox()
    steps, _ = _through_proxy(steps_for, redis_url, sandbox, VIDQ_STEP_GRACE_S="10.5",
                              VIDQ_POST_DEADLINE_S="5")  # 0.5 s of patience
    ref, token = _admit_one(steps)
    steps.store.redis.hset(keys.job(ref), mapping={
        "posting_at": repr(steps.store.now()), "posting_op": "a0a0a0a0",
        "unconfirmed_op": "a0a0a0a0"})
    real_run = steps.store.run_with_waits

    def never_lands(build):
        raise redis.ConnectionError("the marker's request never reaches Redis")

    steps.store.run_with_waits = never_lands
    tasks._run(steps, "submit", steps.claim(ref, token, "submit"))
    steps.store.run_with_waits = real_run
    step, _, token = steps.sent[-1]
    tasks._run(steps, step, steps.claim(ref, token, step))
    record = steps.store.get(ref)

    assert record.extra.get("outcome_unknown") != "1", record.last_error
    assert record.generation_id and record.state == "submitted", record.last_error
    assert sandbox.stats()["submissions"] == 1



def test_a_submit_sent_again_while_its_post_may_answer_waits_for_the_answer(
        steps_for, make_sandbox):  # noqa: F811
    """CI, everysec Redis: the id's record and the step's next write were lost
    in a crash; the step's retry met the restored marker and failed the job
    "outcome unknown" while the POST thread was about to record the id again.
    The batch looked finished with a failure, then reopened. While the POST's
    entry on the wire lasts, the submit now looks again later: one POST, the
    id recorded, the job never failed."""
    sandbox = make_sandbox()
    steps = steps_for(sandbox)
    ref, token = _admit_one(steps)
    client = steps.store.redis
    seconds, _ = client.time()
    _sent_by_a_live_worker(client, ref, seconds - 1)

    tasks._run(steps, "submit", steps.claim(ref, token, "submit"))
    step, _, token = steps.sent[-1]
    assert (step, steps.store.get(ref).state) == ("submit", "queued")
    paid = UpstreamClient(steps.settings).submit(steps.store.get(ref).request)
    steps.store.record_generation(steps.store.get(ref), paid.id, lease_s=30)

    tasks._run(steps, "submit", steps.claim(ref, token, "submit"))
    for _ in range(20):
        step, _, token = steps.sent[-1]
        tasks._run(steps, step, steps.claim(ref, token, step))
        if step == "download":
            break
        time.sleep(0.2)
    record = steps.store.get(ref)
    [entry] = sandbox.state.ledger()
    assert record.state == "done" and record.extra["sha256"] == entry["sha256"]
    assert client.hget(keys.batch("b"), "reopened") is None and not record.extra.get(
        "outcome_unknown")


@pytest.mark.parametrize("sent", ["by a worker that died", "longer ago than the POST deadline"])
def test_a_submit_sent_again_waits_no_longer_than_its_post_could_answer(steps_for, sent):  # noqa: F811
    """Review 98: the wait had no bound but the entry's renewals (a taken-over
    job waited 113 s for a trickled answer, past its hard limit). Past the POST
    deadline, or with its sender dead and its entry lapsed, the job ends
    "outcome unknown" at once (a late id still revives it), its slot held
    from the marker on, when the generation, if any, started."""
    steps = steps_for(VIDQ_POST_DEADLINE_S="20")
    ref, token = _admit_one(steps)
    client = steps.store.redis
    seconds, _ = client.time()
    sent_at = seconds - (25 if "deadline" in sent else 1)
    _sent_by_a_live_worker(client, ref, sent_at)
    if "died" in sent:
        client.delete(keys.worker_alive("w-sender"))
        client.zadd(keys.batch_open_posts("b"), {f"{ref}#op-1": seconds * 1000 - 1})

    tasks._run(steps, "submit", steps.claim(ref, token, "submit"))
    record = steps.store.get(ref)
    assert (record.state, record.extra["outcome_unknown"]) == ("failed", "1")
    assert not steps.sent
    hold = generation_hold_s(steps.settings.deadline_s, steps.durations, record.request)
    assert abs(client.zscore(keys.SLOT_HOLDS, ref) - (sent_at + hold)) < 2


def test_a_submit_sent_again_waits_for_a_sender_cut_off_from_redis(steps_for):  # noqa: F811
    """Review 101: a sender cut off from Redis for a few seconds misses its
    heartbeat while its thread still reads the answer; the job was failed,
    then revived when the id came. Its entry on the wire outlives the cut."""
    steps = steps_for()
    ref, token = _admit_one(steps)
    client = steps.store.redis
    seconds, _ = client.time()
    _sent_by_a_live_worker(client, ref, seconds - 1)
    client.delete(keys.worker_alive("w-sender"))

    tasks._run(steps, "submit", steps.claim(ref, token, "submit"))
    assert (steps.sent[-1][0], steps.store.get(ref).state) == ("submit", "queued")


def _sent_by_a_live_worker(client: redis.Redis, ref: str, at: int) -> None:
    """The job's marker, as a POST sent at `at` (Redis time) by worker w-sender
    leaves it while its answer is read or recorded: the entry on the wire, and
    the sender's heartbeat."""
    client.hset(keys.job(ref), mapping={"posting_at": f"{at}.0", "posting_op": "op-1",
                                        "posting_by": "w-sender"})
    client.zadd(keys.batch_open_posts("b"), {f"{ref}#op-1": (at + 30) * 1000})
    client.set(keys.worker_alive("w-sender"), keys.STEPS_WORKER, ex=60)


def test_the_marker_says_when_the_post_was_sent_to_the_microsecond(redis_url):
    """Its time was Redis's seconds and microseconds joined unpadded: 5,123 us
    read as 0.5123 s, and the wait for a POST's answer was off by up to 1 s."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = JobStore(client)
    for n in range(32):  # 1.1 s in steps of 35 ms: some within 100 ms of a whole second
        time.sleep(0.035)
        job_key = keys.job(f"stamps:{n}")
        client.hset(job_key, mapping={"token": "run:t", "holder": "w"})
        store.script("mark_posting")(keys=[job_key, keys.batch("stamps")],
                                     args=["run:t", f"op-{n}", ""])
        sent, now = float(client.hget(job_key, "posting_at")), store.now()
        assert 0 <= now - sent < 0.5, (client.hget(job_key, "posting_at"), now)
