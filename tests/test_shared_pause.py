"""The shared 429 pause and the effective cap on a bad night: what an
adversarial review broke, each case on real Redis, the sandbox over HTTP
(behind tests/chaos/faultproxy.py where an answer must come late) or a real
local HTTP server for odd headers.
"""
from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
import requests
from chaos.faultproxy import FaultProxy
from test_steps import _admit_one, steps_for  # noqa: F401 - fixture

from worker import keys, tasks
from worker.errors import RateLimited
from worker.jobs import Job
from worker.retry import failures, retry
from worker.settings import Settings
from worker.upstream import UpstreamClient

MODEL = "alibaba/wan2.1-t2v-turbo"


def test_a_recovered_submit_that_meets_a_pause_is_never_posted_again(steps_for):  # noqa: F811
    """A worker died mid-POST (the marker is written, the answer never came);
    another job's 429 has paused submits when the reconciler re-sends the
    submit. The job must end "outcome unknown", not go back in line to be POSTed
    (and paid) a second time once the pause ends."""
    steps = steps_for()
    ref, token = _admit_one(steps)
    steps.store.redis.hset(keys.job(ref), "posting_at", repr(time.time() - 5))
    steps.store.pause_submits(30)
    job = steps.claim(ref, token, "submit")
    tasks._run(steps, "submit", job)

    record = steps.store.get(ref)
    assert record.state == "failed" and record.extra.get("outcome_unknown") == "1"
    assert steps.admission.waiting("b") == 0  # not back in line
    assert steps.store.redis.hget(keys.job(ref), "posting_at")  # the marker is kept


@contextlib.contextmanager
def _post_answered_429_late(steps_for, make_sandbox, deadline_s: float):  # noqa: F811
    """A job whose POST the gateway holds 2 s before the upstream answers 429,
    its step given up after `deadline_s`. Yields (steps, sandbox, proxy, ref)."""
    sandbox = make_sandbox(time_scale=45)
    proxy = FaultProxy(sandbox.url, slow_s=2.0).start()
    try:
        steps = steps_for(sandbox, AIMLAPI_BASE_URL=proxy.url,
                          VIDQ_POST_DEADLINE_S=str(deadline_s))
        ref, token = _admit_one(steps)
        proxy.queue("slow_headers", count=1, method="POST")
        # Retry-After 3: still on when a loaded test process gets to look.
        requests.post(sandbox.url + "/__faults", json={"submit": [429], "retry_after": 3},
                      timeout=10).raise_for_status()
        tasks._run(steps, "submit", steps.claim(ref, token, "submit"))
        assert steps.store.get(ref).state == "failed"  # outcome unknown, for now
        yield steps, sandbox, proxy, ref
    finally:
        proxy.stop()


def test_a_429_that_comes_after_the_post_deadline_puts_the_job_back_in_line(
        steps_for, make_sandbox):  # noqa: F811
    """The gateway holds the POST past VIDQ_POST_DEADLINE_S, then answers 429:
    the job first fails "outcome unknown", and once the 429 arrives (nothing was
    created) it goes back in line and ends done. No job fails for a 429."""
    with _post_answered_429_late(steps_for, make_sandbox, 1.0) as (steps, sandbox, _, ref):
        deadline = time.monotonic() + 15
        while steps.store.get(ref).state != "queued" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert steps.store.get(ref).state == "queued"
        assert steps.store.redis.pttl(keys.PAUSE_SUBMIT) > 0  # the 429 paused submits
        time.sleep(3.2)
        ((ref, token),) = steps.admission.pump()
        tasks._run(steps, "submit", steps.claim(ref, token, "submit"))
    record = steps.store.get(ref)
    assert record.generation_id and record.state == "submitted"
    assert sandbox.stats()["submissions"] == 1 and sandbox.stats()["rate_limited"] == 1


def test_a_shorter_retry_after_does_not_cut_a_longer_pause_short(steps_for):  # noqa: F811
    """Two POSTs in flight meet 429s: Retry-After 600, then 1. Before, the second
    pause replaced the first and both jobs were POSTed again 596 s early."""
    steps = steps_for()
    ref, token = _admit_one(steps)
    steps.store.pause_polls(600)
    steps.store.pause_polls(1)
    steps.store.pause_submits(600)
    steps.store.back_in_line(steps.claim(ref, token, "submit"), 1.0, rate_limited=True)

    assert steps.store.redis.pttl(keys.PAUSE_SUBMIT) > 590_000
    assert steps.store.redis.pttl(keys.PAUSE_POLL) > 590_000


def _admit(steps, count: int, running: int = 0) -> list[Job]:
    """`count` jobs admitted under a cap of `count`, claimed for their submit;
    the first `running` of them have a generation id (running upstream)."""
    steps.admission.set_cap(count)
    steps.admission.enqueue("b", [(f"j{i}", {"model": MODEL, "prompt": f"p {i}"})
                                  for i in range(count)], time.time())
    jobs = [steps.claim(ref, token, "submit") for ref, token in steps.admission.pump()]
    for job in jobs[:running]:
        steps.store.record_generation(job, f"gen-{job.id}", 60)
    return jobs


def test_a_job_refused_by_a_429_is_the_next_posted_ahead_of_other_batches(
        steps_for):  # noqa: F811
    """C = 1, batches A and B waiting in turn: A's job meets a 429 and goes
    back to the front of the line, its batch ahead of B in the ring (it was
    already there, behind B), so it is the next one POSTed."""
    steps = steps_for()
    steps.admission.set_cap(1)
    for batch in ("A", "B"):
        steps.admission.enqueue(batch, [(f"{batch.lower()}{i}", {"model": MODEL,
                                                                 "prompt": f"{batch} {i}"})
                                        for i in range(2)], time.time())
    [(ref, token)] = steps.admission.pump()
    assert ref == keys.job_ref("A", "a0")
    refused = steps.claim(ref, token, "submit")
    steps.store.back_in_line(refused, 0.0, rate_limited=True)

    [(ref, _)] = steps.admission.pump()
    assert ref == keys.job_ref("A", "a0")


def test_a_burst_of_429s_on_posts_sent_together_halves_the_cap_once(steps_for):  # noqa: F811
    """Eight POSTs sent together all meet 429 with nothing running: that is one
    signal, not eight. Before, each put-back lowered the cap to the slots still
    held, down to 1, which then took minutes to climb back."""
    steps = steps_for()
    caps = [steps.store.back_in_line(job, 1.0, rate_limited=True) for job in _admit(steps, 8)]
    assert caps == [8] + [4] * 7


def test_one_429_does_not_lower_the_cap_and_a_repeat_stops_at_those_running(
        steps_for):  # noqa: F811
    """A 429 while fewer generations ran than the cap says the limit may be
    lower; a second one lowers it, by half at most and never below the
    generations the upstream was running for us (jobs with an id, not those
    admitted but not yet POSTed)."""
    steps = steps_for()
    jobs = _admit(steps, 8, running=3)
    assert steps.store.back_in_line(jobs[3], 1.0, rate_limited=True) == 8
    assert steps.store.back_in_line(jobs[4], 1.0, rate_limited=True) == 4
    steps.store.redis.hset(keys.CONFIG, "lowered_at", 0)  # past the settle time
    assert steps.store.back_in_line(jobs[5], 1.0, rate_limited=True) == 3


def test_a_429_that_lowers_nothing_keeps_the_climb_back(steps_for):  # noqa: F811
    """At an effective C of 1, a repeated 429 cannot lower it: it reset the
    credit earned towards C all the same, so stray 429s (another shell's
    pacing) kept C low for a whole batch. The credit stands."""
    steps = steps_for()
    [job] = _admit(steps, 1)
    steps.store.redis.hset(keys.CONFIG, mapping={
        "effective_cap": 1, "cap_credit": 5, "lowered_at": 0,
        "under_cap_429_until": int(time.time()) + 60})

    assert steps.store.back_in_line(job, 1.0, rate_limited=True) == 1
    assert steps.store.redis.hget(keys.CONFIG, "cap_credit") == "5"


def test_the_cap_does_not_grow_while_submits_are_paused(steps_for):  # noqa: F811
    """Nothing is learned during a pause: a 1 h Retry-After must not find the
    full cap restored, one quiet step at a time, when it ends."""
    steps = steps_for()
    steps.admission.set_cap(8)
    steps.store.redis.hset(keys.CONFIG, mapping={"effective_cap": 2, "last_429_at": 0})
    steps.store.pause_submits(60)
    assert steps.store.grow_cap(4, quiet_s=30, completed=False) == 2
    steps.store.redis.delete(keys.PAUSE_SUBMIT)
    steps.store.redis.hset(keys.CONFIG, "last_429_at", 0)
    assert steps.store.grow_cap(4, quiet_s=30, completed=False) == 3


def test_a_poll_pause_longer_than_the_longest_countdown_is_waited_out_in_parts(
        steps_for):  # noqa: F811
    """Countdowns stay under the broker's visibility timeout (else the message
    is handed out twice): a 1 h poll pause is waited out in several polls."""
    steps = steps_for(VIDQ_POLL_MAX_INTERVAL_S="60")
    ref, token = _admit_one(steps)
    tasks._run(steps, "submit", steps.claim(ref, token, "submit"))
    countdowns = []
    steps.dispatch = lambda step, ref, token, countdown: countdowns.append((step, token, countdown))
    steps.store.pause_polls(3600)
    token = steps.sent[-1][2]  # the first poll, dispatched by the submit
    tasks._run(steps, "poll", steps.claim(ref, token, "poll"))
    assert countdowns and countdowns[-1][0] == "poll" and countdowns[-1][2] <= 60


class _Answers429(BaseHTTPRequestHandler):
    headers_to_send: dict[str, str] = {}

    def do_GET(self):
        self.send_response(429)
        for name, value in self.headers_to_send.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def send_response(self, code, message=None):  # no automatic Date: the test sets it
        self.log_request(code)
        self.send_response_only(code, message)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("form", ["rfc1123", "asctime"])
def test_an_http_date_retry_after_is_read_against_the_servers_clock_in_gmt(form, monkeypatch):
    """Retry-After as a date: the wait is the date minus the server's own Date
    (the worker's clock may be off by minutes), and the asctime form, which
    names no zone, is GMT whatever the worker's time zone."""
    server_now = time.time() - 1800  # the server's clock is 30 min behind the worker's
    retry_at = server_now + 60
    if form == "asctime":
        value = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(retry_at))
    else:
        value = email.utils.formatdate(retry_at, usegmt=True)
    _Answers429.headers_to_send = {"Retry-After": value,
                                   "Date": email.utils.formatdate(server_now, usegmt=True)}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers429)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        client = UpstreamClient(Settings(api_key="sk-x", base_url=base))
        with pytest.raises(RateLimited) as caught:
            client.fetch("gen-1")
    finally:
        server.shutdown()
        monkeypatch.delenv("TZ")
        time.tzset()
    assert caught.value.retry_after == pytest.approx(60, abs=1.5)


# Retry-After unreadable: the default pause (None); Date unreadable: the
# worker's clock, against which 2025 is past (no wait).
@pytest.mark.parametrize("header, wait", [("Retry-After", None), ("Date", 0.0)])
def test_a_retry_after_date_out_of_range_is_still_a_429(header, wait):
    """A date whose fields no clock holds, in Retry-After or in Date: still a
    429 (the default pause), never an error that would end a paid job's poll
    or leave a POST's marker behind."""
    _Answers429.headers_to_send = {
        "Retry-After": "Mon, 01 Jan 2025 00:00:00 GMT",
        "Date": "Sun, 31 Dec 2024 23:59:00 GMT",
        header: "Mon, 01 Jan 2025 00:99999999999:00 GMT"}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers429)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = UpstreamClient(Settings(api_key="sk-x",
                                         base_url=f"http://127.0.0.1:{server.server_port}"))
        with pytest.raises(RateLimited) as caught:
            client.fetch("gen-1")
    finally:
        server.shutdown()
    assert caught.value.retry_after == wait


def test_vidq_status_names_a_poll_pause_as_well_as_a_submit_pause(redis_url, tmp_path):
    """A 429 on a status GET pauses every worker's polls: the operator sees it."""
    path = tmp_path / "p.txt"
    path.write_text("one\ntwo\n")
    env = {**os.environ, "VIDQ_REDIS_URL": redis_url}
    enqueued = subprocess.run(["vidq", "enqueue", str(path), "--batch", "night"], env=env,
                              capture_output=True, text=True, timeout=120)
    assert enqueued.returncode == 0, enqueued.stderr
    client = redis.Redis.from_url(redis_url)
    client.set(keys.PAUSE_POLL, "1", px=120_000)
    client.set(keys.PAUSE_SUBMIT, "1", px=30_000)

    status = subprocess.run(["vidq", "status", "night"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert "polls paused for 1" in status.stdout and "submits paused for " in status.stdout


def test_vidq_cap_says_when_429s_lowered_c(redis_url):
    """`vidq cap` said "C = 6" while 429s had the workers at 3 (`vidq status` told)."""
    client = redis.Redis.from_url(redis_url)
    client.hset(keys.CONFIG, mapping={"max_in_flight": 6, "effective_cap": 3})
    env = {**os.environ, "VIDQ_REDIS_URL": redis_url}

    shown = subprocess.run(["vidq", "cap"], env=env, capture_output=True, text=True, timeout=60)

    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("C = 6; lowered to 3 after 429s"), shown.stdout


def test_a_late_429_of_an_old_attempt_leaves_a_newer_attempts_marker_alone(
        steps_for, make_sandbox):  # noqa: F811
    """Attempt 1's POST is held and answers 429 late; meanwhile the user re-POSTed
    the job (`vidq retry --resubmit-unknown`) and attempt 2's POST is held too.
    Attempt 1's answer must neither erase attempt 2's marker nor put the job
    back in line: attempt 2 may have created a generation (a third POST would
    pay twice)."""
    with _post_answered_429_late(steps_for, make_sandbox, 0.5) as (steps, sandbox, proxy, ref):
        answers = retry(steps.admission, steps.dispatch, "b", failures(steps.store, "b"),
                        resubmit_unknown=True).answers
        assert answers == {"resubmitted": 1}
        proxy.slow_s = 6.0
        proxy.queue("slow_headers", count=1, method="POST")
        _, ref, token = steps.sent[-1]
        tasks._run(steps, "submit", steps.claim(ref, token, "submit"))  # attempt 2 gives up
        second = steps.store.redis.hget(keys.job(ref), "posting_at")
        assert second and steps.store.get(ref).state == "failed"

        time.sleep(3.5)  # attempt 1's 429 has come (at ~2 s), and any revive with it
        assert sandbox.stats()["rate_limited"] == 1
        assert steps.store.redis.hget(keys.job(ref), "posting_at") == second
        assert steps.store.get(ref).state == "failed"


def test_429s_further_apart_than_a_minute_still_lower_the_cap_after_a_long_pause(
        steps_for):  # noqa: F811
    """Each 429 says Retry-After 90: the next one comes after that pause, more
    than 60 s after the first. It still counts as a repeat (the window starts
    when the pause ends), so the cap comes down to the generations running."""
    steps = steps_for()
    jobs = _admit(steps, 4, running=3)
    assert steps.store.back_in_line(jobs[3], 90.0, rate_limited=True) == 4
    # As written 61 s ago by that 429 (90 s pause, then 60 s to repeat).
    now = steps.store.redis.time()[0]
    steps.store.redis.hset(keys.CONFIG, "under_cap_429_until", now - 61 + 90 + 60)
    steps.store.redis.delete(keys.PAUSE_SUBMIT)
    ((ref, token),) = steps.admission.pump()
    assert steps.store.back_in_line(steps.claim(ref, token, "submit"), 90.0,
                                    rate_limited=True) == 3



def test_a_429_to_resubmits_look_pauses_polls_and_spends_no_attempt(make_pipeline, make_sandbox,
                                                                     tmp_path):
    """A job failed at the hard limit while generating; its generation then
    completed. `vidq retry --resubmit` looks at the old id before POSTing, and
    the look meets a run of 429s. It went through the job's own retries,
    spending an attempt each and pausing no other poll, until the job failed
    "gave up" with its paid video never fetched. Now the 429s pause polls for
    every worker, the look waits them out, and the video is downloaded."""
    from conftest import write_prompts
    from test_batch_ops import report, vidq

    sandbox = make_sandbox(time_scale=1, mean_generation_s=4, spread=0)
    pipeline = make_pipeline(sandbox, VIDQ_EXPECTED_GENERATION_S=4, VIDQ_DEADLINE_S=1,
                             VIDQ_HARD_LIMIT_S=2, VIDQ_MAX_ATTEMPTS=1)
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "a.txt", ["finished later"]), "late")
    assert pipeline.wait_finished("late", timeout_s=30)["failed"] == 1
    [paid] = pipeline.ledger()
    wait_until_completed = time.monotonic() + 30
    while {e["id"]: e for e in pipeline.ledger()}[paid["id"]]["status"] != "completed":
        assert time.monotonic() < wait_until_completed, "the generation never completed"
        time.sleep(0.2)
    limited = 6  # over VIDQ_MAX_ATTEMPTS x the 429 allowance (5)
    pipeline.faults(poll=[429] * limited, retry_after=1)

    retried = vidq(pipeline, "retry", "late", "--resubmit", "--yes")
    assert retried.returncode == 0, retried.stderr

    assert pipeline.wait_finished("late", timeout_s=60)["done"] == 1
    [row] = report(pipeline, "late")
    assert row["generation_ids"] == [paid["id"]] and len(pipeline.ledger()) == 1
    video = (tmp_path / "videos" / "late" / f"{row['custom_id']}.mp4").read_bytes()
    assert hashlib.sha256(video).hexdigest() == row["sha256"] == pipeline.ledger()[0]["sha256"]
    log = (pipeline.log_dir / "worker-0.log").read_text()
    assert log.count("429 on a status GET: polls paused 1 s for every worker") == limited


def test_the_eta_waits_out_a_429_pause(make_pipeline, tmp_path):
    """A 429 with `Retry-After: 30` paused submits; `vidq status` said "ETA 2 s"."""
    from conftest import wait_until, write_prompts
    from test_batch_ops import vidq

    pipeline = make_pipeline()
    pipeline.faults(submit=[429], retry_after=30)
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "a.txt", ["one", "two", "three"]), "paused")
    wait_until(lambda: pipeline.store.redis.pttl(keys.PAUSE_SUBMIT) > 0, what="a submit pause")

    shown = vidq(pipeline, "status", "paused", "--json")
    status = json.loads(shown.stdout)
    assert status["waiting"] and status["eta_s"] >= 20, status
    assert "after the 429 pause" in status["eta_basis"]
    pipeline.stop_workers()


@pytest.mark.slow
def test_429s_without_retry_after_pause_for_the_default_and_cost_no_job(make_pipeline,
                                                                        tmp_path):
    """The contract says to honour `Retry-After` "when present": the real API
    may leave it out. A 429 without it, on a submit and on a status GET, pauses
    that kind of call for every worker for the default pause, spends no
    attempt (one allowed here), POSTs nothing twice, and the batch ends done."""
    from conftest import write_prompts
    from test_batch_ops import report

    from worker.rate_limits import DEFAULT_PAUSE_S

    pipeline = make_pipeline(VIDQ_MAX_ATTEMPTS=1)
    pipeline.faults(submit=[429], poll=[429], retry_after=None)
    pipeline.start_workers()
    prompts = ["no header one", "no header two", "no header three"]
    pipeline.enqueue(write_prompts(tmp_path / "a.txt", prompts), "bare")
    assert pipeline.wait_finished("bare", timeout_s=90)["done"] == len(prompts)

    assert pipeline.sandbox.stats()["rate_limited"] == 1  # POSTs only; the GET's is logged
    ledger = pipeline.ledger()
    rows = report(pipeline, "bare")
    assert len(ledger) == len(prompts) == len(rows)  # one POST a video
    assert {r["generation_ids"][0] for r in rows} == {e["id"] for e in ledger}
    log = (pipeline.log_dir / "worker-0.log").read_text()
    assert f"429 on submit: submits paused {DEFAULT_PAUSE_S:.0f} s for every worker" in log
    assert f"429 on a status GET: polls paused {DEFAULT_PAUSE_S:.0f} s for every worker" in log


def test_a_429_whose_body_broke_off_is_still_a_429_on_a_post_and_a_get(proxied, tmp_path):
    """The status line and Retry-After of a 429 arrive whole, its JSON body
    is cut (the connection closes mid-body). The status decides: the POST's
    job goes back in line (it was failed "outcome unknown", its slot held for
    a generation that never existed), and the GET pauses every worker's polls
    for the Retry-After (it was retried at once, spending an attempt, with no
    pause: review 138). With one attempt allowed, the batch still ends done."""
    from conftest import write_prompts

    pipeline, proxy = proxied(VIDQ_MAX_ATTEMPTS="1")
    pipeline.faults(submit=[429], poll=[429], retry_after=4)
    proxy.queue("truncate_body", count=1, method="POST")
    proxy.queue("truncate_body", count=1, method="GET")
    pipeline.start_workers()
    started = time.monotonic()
    pipeline.enqueue(write_prompts(tmp_path / "a.txt", ["a cut 429 body"]), "cut")
    counts = pipeline.wait_finished("cut", timeout_s=90)

    job = pipeline.store.get(f"cut:{pipeline.store.job_ids('cut')[0]}")
    assert counts["done"] == 1, job.last_error
    assert len(pipeline.ledger()) == 1 and pipeline.sandbox.stats()["rate_limited"] == 1
    log = (pipeline.log_dir / "worker-0.log").read_text()
    assert "429 on submit: submits paused 4 s for every worker" in log
    assert "429 on a status GET: polls paused 4 s for every worker" in log
    assert time.monotonic() - started >= 8  # both pauses waited out


def test_a_429_met_by_a_step_taken_over_meanwhile_still_pauses_submits(
        steps_for):  # noqa: F811
    """The copy of a submit that met the 429 lost its job to another copy
    meanwhile: it leaves the job alone, but the 429 is about the account, and
    submits pause for every worker all the same (review 138: none did)."""
    steps = steps_for()
    ref, token = _admit_one(steps)
    job = steps.claim(ref, token, "submit")
    steps.store.redis.hset(keys.job(ref), "token", "another copy's")
    steps.store.back_in_line(job, 20, rate_limited=True)
    assert steps.store.redis.pttl(keys.PAUSE_SUBMIT) > 15_000
    assert steps.store.redis.hget(keys.job(ref), "token") == "another copy's"
    assert steps.admission.waiting("b") == 0  # the job is the other copy's
