"""Step logic without Celery: real Redis, the sandbox over HTTP, real storage.

`dispatch` here records what would be published instead of publishing it.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
import requests

from sandbox.videos import render_clip
from tests.conftest import wait_until
from worker import keys
from worker.contract import shape_of
from worker.errors import CorruptVideo, RequestRejected, ResultLinkExpired, UpstreamUnavailable
from worker.keys import durations, job_ref
from worker.marker import mark_posting
from worker.recovery import reconcile
from worker.settings import Settings
from worker.storage import FileStorage
from worker.tasks import build_steps


@pytest.fixture
def steps_for(redis_url, make_sandbox, tmp_path):
    def build(sandbox=None, **env):
        sandbox = sandbox or make_sandbox()
        settings = Settings.from_env({
            "VIDQ_REDIS_URL": redis_url, "AIMLAPI_BASE_URL": sandbox.url,
            "AIMLAPI_KEY": sandbox.config.api_key, "VIDQ_STORAGE_URL": tmp_path.as_uri(),
            "VIDQ_EXPECTED_GENERATION_S": "1", "VIDQ_POLL_MIN_INTERVAL_S": "0.1",
            # Steps driven by hand have no countdowns to wait for a turn to POST.
            "VIDQ_MAX_SUBMITS_PER_S": "0", "VIDQ_JOURNAL_DIR": str(tmp_path / "journal"),
            **env})
        steps = build_steps(settings)
        steps.admission.set_cap(4)
        steps.sent = []
        steps.dispatch = lambda step, ref, token, countdown: steps.sent.append((step, ref, token))
        return steps
    return build


def _admit_one(steps, prompt="a small boat", job_id="j1"):
    steps.admission.enqueue("b", [(job_id, {"model": "alibaba/wan2.1-t2v-turbo", "prompt": prompt})],
                            time.time())
    ((ref, token),) = steps.admission.pump()
    return ref, token


def _run(steps, step, ref, token):
    job = steps.claim(ref, token, step)
    assert job is not None
    getattr(steps, step)(job)
    return steps.store.get(ref)


def _until_completed(steps, ref, token, first="submit"):
    """Drive submit and polls by hand until the download step is next."""
    step = first
    while step != "download":
        _run(steps, step, ref, token)
        step, _, token = steps.sent[-1]
        time.sleep(0.2)
    return token


def test_wrong_key_fails_at_once_without_leaking_it(steps_for, make_sandbox):
    """A 401 on submit is terminal, carries the upstream's message, not the key."""
    sandbox = make_sandbox()
    steps = steps_for(sandbox, AIMLAPI_KEY="sk-wrong-secret-123")
    ref, token = _admit_one(steps)
    job = steps.claim(ref, token, "submit")

    with pytest.raises(RequestRejected) as raised:
        steps.submit(job)
    steps.fail(job, str(raised.value))

    assert "401" in str(raised.value) and "sk-wrong-secret-123" not in str(raised.value)
    record = steps.store.get(ref)
    assert record.state == "failed" and "sk-wrong" not in record.last_error
    assert steps.admission.in_flight() == 0


def test_past_the_deadline_a_job_is_overdue_keeps_its_slot_and_is_still_downloaded(
        steps_for, make_sandbox):
    """Still pending after VIDQ_DEADLINE_S: overdue, polled slowly, slot held, then done."""
    steps = steps_for(make_sandbox(time_scale=45), VIDQ_DEADLINE_S="0.3",
                      VIDQ_OVERDUE_POLL_INTERVAL_S="0.5")
    ref, token = _admit_one(steps)
    _run(steps, "submit", ref, token)
    time.sleep(0.4)

    record = _run(steps, "poll", ref, steps.sent[-1][2])
    assert record.state == "overdue" and record.generation_id
    assert steps.admission.in_flight() == 1
    time.sleep(2.5)
    token = _until_completed(steps, ref, steps.sent[-1][2], first="poll")
    assert _run(steps, "download", ref, token).state == "done"
    # Its age is vidq's waiting, not a generation time: nothing learned.
    assert steps.store.redis.llen(durations("alibaba/wan2.1-t2v-turbo", "720P")) == 0


def test_an_overdue_job_is_polled_within_the_longest_countdown(steps_for, make_sandbox):
    """VIDQ_POLL_MAX_INTERVAL_S bounds every poll countdown, an overdue job's
    too (its own interval, 60 s by default, is longer here)."""
    steps = steps_for(make_sandbox(time_scale=3), VIDQ_DEADLINE_S="0.3",
                      VIDQ_POLL_MAX_INTERVAL_S="5")
    countdowns = []
    steps.dispatch = lambda step, ref, token, countdown: countdowns.append((step, token, countdown))
    ref, token = _admit_one(steps)
    _run(steps, "submit", ref, token)
    time.sleep(0.4)
    assert _run(steps, "poll", ref, countdowns[-1][1]).state == "overdue"
    assert countdowns[-1][0] == "poll" and countdowns[-1][2] == 5


def test_a_first_poll_held_back_far_past_its_aim_teaches_the_plan_nothing(steps_for,
                                                                          make_sandbox):
    """A 429 pause or a backlog held a first poll (aimed at ~1 s) until 4 s: that the
    video was done by then does not mean the plan polls too late. A job polled on
    time is learned from."""
    steps = steps_for(make_sandbox(time_scale=45))  # ~2 s generations
    shape = durations("alibaba/wan2.1-t2v-turbo", "720P")
    ref, token = _admit_one(steps, "held back")
    _run(steps, "submit", ref, token)
    assert steps.store.get(ref).number("first_aim") <= 1.0
    time.sleep(4.0)
    assert _run(steps, "poll", ref, steps.sent[-1][2]).completed_at
    assert steps.store.redis.llen(shape) == 0

    ref, token = _admit_one(steps, "on time", "j2")
    _until_completed(steps, ref, token)
    assert steps.store.redis.llen(shape) == 1


def test_the_hard_limit_fails_the_job_frees_the_slot_and_keeps_generation_id(
        steps_for, make_sandbox):
    steps = steps_for(make_sandbox(time_scale=1), VIDQ_DEADLINE_S="0.3",
                      VIDQ_HARD_LIMIT_S="0.5")
    ref, token = _admit_one(steps)
    _run(steps, "submit", ref, token)
    time.sleep(0.6)

    record = _run(steps, "poll", ref, steps.sent[-1][2])

    assert record.state == "failed" and record.last_error.startswith("timeout")
    assert record.generation_id
    assert steps.admission.in_flight() == 0


def test_expired_link_is_refreshed_by_polling_again(steps_for, make_sandbox):
    """A result URL that expired (403) sends the job back to poll for a fresh one."""
    sandbox = make_sandbox()
    steps = steps_for(sandbox)
    ref, token = _admit_one(steps)
    token = _until_completed(steps, ref, token)
    job = steps.claim(ref, token, "download")
    requests.post(sandbox.url + "/__expire", json={"id": job.generation_id}, timeout=5)

    with pytest.raises(ResultLinkExpired):
        steps.download(job)
    steps.refresh_link(job, ResultLinkExpired("expired"))
    step, _, token = steps.sent[-1]
    assert step == "poll"
    _run(steps, "poll", ref, token)
    step, _, token = steps.sent[-1]
    record = _run(steps, step, ref, token)

    assert record.state == "done"
    assert sandbox.stats()["submissions"] == 1


def test_download_that_is_not_mp4_is_refused_and_nothing_published(steps_for, redis_url,
                                                                     serve_bytes, tmp_path):
    """Bytes without an `ftyp` box raise CorruptVideo and leave no file behind."""
    url = serve_bytes(b"<html>this is no video</html>" * 10) + "/v.mp4"
    steps = steps_for()
    ref, token = _admit_one(steps)
    redis.Redis.from_url(redis_url).hset(
        "vidq:job:" + ref, mapping={"video_url": url,
                                    "state": "downloading"})
    job = steps.claim(ref, token, "download")
    with pytest.raises(CorruptVideo, match="ftyp"):
        steps.download(job)
    assert not any(tmp_path.rglob("*.mp4")) and not any(tmp_path.rglob("*.part"))
    assert job_ref("b", "j1") == ref


def test_retry_polls_a_timed_out_generation_and_downloads_it_late(steps_for, make_sandbox):
    """A job failed by timeout is requeued by `vidq retry`, polled (not re-posted), and its
    late video lands."""
    sandbox = make_sandbox(time_scale=45)  # ~2 s generations
    steps = steps_for(sandbox, VIDQ_DEADLINE_S="0.3", VIDQ_HARD_LIMIT_S="0.3")
    ref, token = _admit_one(steps)
    _run(steps, "submit", ref, token)
    time.sleep(0.4)
    assert _run(steps, "poll", ref, steps.sent[-1][2]).state == "failed"
    time.sleep(2.5)

    assert steps.admission.requeue_failed("b") == {"requeued": 1}
    assert steps.admission.pump() == []  # paid: it takes a slot at once, not a place in line
    assert steps.admission.in_flight() == 1
    reconcile(steps.admission, steps.dispatch, steps.settings.step_grace_s)
    step, _, token = steps.sent[-1][:3]
    assert step == "poll"
    token = _until_completed(steps, ref, token)
    record = _run(steps, "download", ref, token)

    assert record.state == "done"
    assert sandbox.stats()["submissions"] == 1


def test_submit_rechecks_the_generation_id_under_its_lock(steps_for, make_sandbox, redis_url):
    """A submit whose copy of the job predates another process's POST does not POST."""
    sandbox = make_sandbox()
    steps = steps_for(sandbox)
    ref, token = _admit_one(steps)
    job = steps.claim(ref, token, "submit")
    redis.Redis.from_url(redis_url).hset("vidq:job:" + ref, "generation_id", "already-paid")

    steps.submit(job)

    assert sandbox.stats()["submissions"] == 0
    assert steps.sent[-1][0] == "poll"


def test_a_late_generation_id_is_kept_due_and_counted_in_flight(steps_for, redis_url):
    """An id recorded after the job's chain ended is still polled, and holds a slot."""
    steps = steps_for()
    ref, token = _admit_one(steps)
    job = steps.claim(ref, token, "submit")
    steps.fail(job, "gave up")  # ends the chain and frees the slot
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.zscore("vidq:due", ref) is None

    steps.store.record_generation(job, "paid-late", 5)

    record = steps.store.get(ref)
    assert record.generation_id == "paid-late" and record.state == "submitted"
    assert client.zscore("vidq:due", ref) is not None
    assert client.zscore("vidq:slots", ref) is not None


def _steps_until_done(steps, ref: str, most: int = 4) -> list[str]:
    """Run the job's next sent step until it is done (at most `most`): the steps run."""
    from worker.tasks import _run as run_step

    seen = []
    for _ in range(most):
        step, _, token = steps.sent[-1]
        seen.append(step)
        run_step(steps, step, steps.claim(ref, token, step))
        if steps.store.get(ref).state == "done":
            break
    return seen


def test_a_result_host_that_cannot_be_reached_gets_a_fresh_link_after_two_tries(
        steps_for, make_sandbox):
    """The saved result link names a host nobody answers on (a `vidq run --sandbox`
    resumed on a new port; a CDN edge gone): after two failed downloads the
    generation is fetched again, and the fresh link's video is stored. (The same
    dead link was tried again until the 24 h hard limit.)"""
    sandbox = make_sandbox()
    steps = steps_for(sandbox)
    ref, token = _admit_one(steps)
    token = _until_completed(steps, ref, token)
    with socket.socket() as closed:  # a port nobody listens on once this closes
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    stale = steps.store.get(ref).extra["video_url"].replace(
        sandbox.url, f"http://127.0.0.1:{dead}")
    steps.store.redis.hset(keys.job(ref), "video_url", stale)

    assert _steps_until_done(steps, ref) == ["download", "download", "poll", "download"]
    record = steps.store.get(ref)
    assert record.state == "done" and record.extra["sha256"]
    assert sandbox.stats()["submissions"] == 1


def test_a_result_link_serving_a_cut_video_gets_a_fresh_link_after_two_tries(
        steps_for, make_sandbox, serve_bytes):
    """The saved link serves a cut copy of the video with a matching length (a
    CDN's cached cut copy): the same link was fetched until the 24 h hard
    limit, each try refused as corrupt (review 131). After two, the
    generation is fetched again, and the fresh link's whole video is stored."""
    sandbox = make_sandbox()
    steps = steps_for(sandbox)
    ref, token = _admit_one(steps)
    token = _until_completed(steps, ref, token)
    video = requests.get(steps.store.get(ref).extra["video_url"], timeout=10).content
    cut = serve_bytes(video[:len(video) // 2], headers={"Content-Type": "video/mp4"})
    steps.store.redis.hset(keys.job(ref), "video_url", cut + "/v.mp4")

    assert _steps_until_done(steps, ref) == ["download", "download", "poll", "download"]
    record = steps.store.get(ref)
    assert record.state == "done" and record.extra["sha256"] == hashlib.sha256(video).hexdigest()
    assert sandbox.stats()["submissions"] == 1


def test_a_result_link_refused_again_and_again_is_refreshed_until_the_hard_limit(steps_for):
    """Fresh links that keep being refused: a paid video is asked for again past
    VIDQ_MAX_ATTEMPTS, and fails only past the hard limit (counted from its
    completion, as the link's life is), its id kept."""
    # A hard limit of 8 s: the generation, then four refreshes, fit in it on
    # a loaded machine (2 s and 4 s did not, once each).
    steps = steps_for(VIDQ_MAX_ATTEMPTS="2", VIDQ_DEADLINE_S="1", VIDQ_HARD_LIMIT_S="8")
    ref, token = _admit_one(steps)
    token = _until_completed(steps, ref, token)
    for _ in range(4):
        job = steps.claim(ref, token, "poll")
        steps.refresh_link(job, ResultLinkExpired("HTTP 403"))
        token = steps.sent[-1][2]
    assert steps.store.get(ref).state != "failed"
    time.sleep(max(0.0, 8.1 - (time.time() - steps.store.get(ref).completed_at)))

    steps.refresh_link(steps.claim(ref, token, "poll"), ResultLinkExpired("HTTP 403"))

    record = steps.store.get(ref)
    assert record.state == "failed" and "refused 5 times" in record.last_error
    assert record.generation_id


def test_an_unexpected_exception_counts_as_an_attempt_and_ends_an_unpaid_job(steps_for,
                                                                            make_sandbox):
    """A bug in a step before anything was paid (here: the duration model
    raising as the submit is about to POST) is not re-sent forever: each run
    counts as an attempt, then the job fails with the reason, nothing POSTed."""
    from worker.tasks import JobFailed, run_step

    sandbox = make_sandbox()
    steps = steps_for(sandbox, VIDQ_MAX_ATTEMPTS="2")
    ref, token = _admit_one(steps)

    def broken(*_args, **_kwargs):
        raise ValueError("odd record")

    steps.store.run_with_waits = broken  # the POST marker's write
    with pytest.raises(JobFailed, match="unexpected ValueError"):
        run_step(steps, "submit", ref, token)
        for _ in range(3):
            step, _, token = steps.sent[-1]
            run_step(steps, step, ref, token)

    record = steps.store.get(ref)
    assert record.state == "failed" and record.attempts <= 2
    assert "unexpected ValueError: odd record" in record.last_error
    assert sandbox.stats()["submissions"] == 0


def test_an_unexpected_exception_on_a_paid_job_is_tried_until_the_hard_limit(steps_for,
                                                                           make_sandbox):
    """A bug once the generation exists (here: the duration model raising as
    the submit plans its first poll, and at every poll) does not end the job
    after VIDQ_MAX_ATTEMPTS: failing it would free its slot while it may still
    be generating. It is tried again until the hard limit, then failed with
    the reason, its generation id kept."""
    from worker.tasks import JobFailed, run_step

    # ~30 s generations: a video that finished first would end the job done,
    # its polls never reaching the broken plan (a loaded machine did that).
    steps = steps_for(make_sandbox(time_scale=3), VIDQ_MAX_ATTEMPTS="2",
                      VIDQ_DEADLINE_S="2", VIDQ_HARD_LIMIT_S="3")
    ref, token = _admit_one(steps)

    def broken(*_args):
        raise ValueError("odd credits_used")

    steps.durations.plan = broken
    run_step(steps, "submit", ref, token)
    runs = 1
    with pytest.raises(JobFailed):
        for _ in range(40):
            step, _, token = steps.sent[-1]
            time.sleep(0.2)
            runs += 1
            run_step(steps, step, ref, token)

    record = steps.store.get(ref)
    assert runs > 2, "failed after VIDQ_MAX_ATTEMPTS, before the hard limit"
    # Ended by the hard limit: at a poll that reached it, or a retry past it.
    assert record.state == "failed"
    assert "hard limit" in record.last_error or "odd credits_used" in record.last_error
    assert record.generation_id
    assert record.number("failed_at") - record.submitted_at >= 3


def test_a_first_poll_held_back_by_a_poll_pause_teaches_nothing(steps_for):
    """A 429 on a status GET pauses every worker's polls, holding back a whole
    wave of first polls: each then finds its video "done by then", which the
    plan would read as its aims being far too late (eight in a row drop what
    it learned). Such a completion is not recorded."""
    steps = steps_for()
    ref, token = _admit_one(steps)
    _run(steps, "submit", ref, token)
    steps.store.pause_polls(1.0)
    step, _, token = steps.sent[-1]
    assert step == "poll" and _run(steps, step, ref, token).polls == 0  # held back
    time.sleep(1.5)  # the pause is over, the ~1 s generation done
    step, _, token = steps.sent[-1]
    record = _run(steps, step, ref, token)

    assert record.polls == 1 and record.step == "download"
    assert steps.store.redis.llen(durations(*shape_of(record.request))) == 0


@pytest.mark.parametrize("sidecar", [None, b"not json", b"[1, 2]"])
def test_a_video_without_a_usable_sidecar_is_moved_aside_not_overwritten(
        steps_for, make_sandbox, tmp_path, sidecar):
    """A video under the job's key with no sidecar, or one nobody can read (the
    sidecar failed until the hard limit, then the batch name was reused): it
    was paid for. The submit moves it to replaced/, named by its sha256, then
    POSTs; nothing is overwritten."""
    sandbox = make_sandbox()
    steps = steps_for(sandbox)
    old = b"\0\0\0\x18ftypisom" + os.urandom(2000)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "j1.mp4").write_bytes(old)
    if sidecar is not None:
        (tmp_path / "b" / "j1.json").write_bytes(sidecar)
    ref, token = _admit_one(steps)

    _run(steps, "submit", ref, token)

    kept = tmp_path / "b" / "replaced" / f"j1.{hashlib.sha256(old).hexdigest()[:16]}.mp4"
    assert kept.read_bytes() == old
    assert not (tmp_path / "b" / "j1.mp4").exists()
    assert sandbox.stats()["submissions"] == 1


def test_setting_a_video_aside_never_replaces_one_and_only_its_owner_moves(steps_for,
                                                                         tmp_path):
    """Two copies of one submit (one re-sent while the other hashed a big
    file): the stale one must not move what the job's new chain stored, and
    a move never lands on a video set aside before."""
    from worker.leases import TakenOver
    from worker.video import set_aside

    steps = steps_for()
    ref, _ = _admit_one(steps)
    job = steps.store.get(ref)
    (tmp_path / "b" / "replaced").mkdir(parents=True)
    (tmp_path / "b" / "replaced" / "j1.g0.mp4").write_bytes(b"V0, set aside before")
    (tmp_path / "b" / "j1.mp4").write_bytes(b"V1, stored since")

    with pytest.raises(TakenOver):
        set_aside(steps.storage, job, {"generation_id": "g1"}, still_ours=lambda: False)
    set_aside(steps.storage, job, {"generation_id": "g0"})

    assert (tmp_path / "b" / "j1.mp4").read_bytes() == b"V1, stored since"
    assert (tmp_path / "b" / "replaced" / "j1.g0.mp4").read_bytes() == b"V0, set aside before"
    assert sorted(p.name for p in (tmp_path / "b" / "replaced").iterdir()) == ["j1.g0.mp4"]


def test_a_worker_killed_after_publishing_a_video_leaves_it_kept(steps_for, make_sandbox,
                                                                 tmp_path, monkeypatch):
    """The worker dies between publishing the video and writing its sidecar;
    then the result link is refused for good. The video stored whole was
    recorded as it was published: the next try writes its sidecar and ends
    the job done, without fetching it again (nor buying it again)."""
    import worker.download_step

    sandbox = make_sandbox()
    steps = steps_for(sandbox)
    ref, token = _admit_one(steps)
    token = _until_completed(steps, ref, token)

    def killed(*_args):
        raise SystemExit("SIGKILL")

    monkeypatch.setattr(worker.download_step, "store_sidecar", killed)
    with pytest.raises(SystemExit):
        _run(steps, "download", ref, token)
    monkeypatch.undo()
    video = (tmp_path / "b" / "j1.mp4").read_bytes()
    record = steps.store.get(ref)
    assert record.extra["kept_sha256"] == hashlib.sha256(video).hexdigest()
    requests.post(sandbox.url + "/__faults", json={"download": [410] * 5},
                  timeout=10).raise_for_status()

    steps.store.redis.zadd(keys.DUE, {ref: 0})  # the reconciler re-sends the step
    reconcile(steps.admission, steps.dispatch, steps.settings.step_grace_s)
    step, _, token = steps.sent[-1]
    done = _run(steps, step, ref, token)

    assert done.state == "done" and done.extra["sha256"] == hashlib.sha256(video).hexdigest()
    assert (tmp_path / "b" / "j1.json").exists()
    assert sandbox.stats()["downloads"] == 1 and sandbox.stats()["submissions"] == 1


def test_leases_use_the_redis_clock_not_the_workers(steps_for, monkeypatch):
    """A worker whose clock runs an hour ahead still leases its step for `grace` seconds
    of Redis time, so no other worker takes it over early."""
    steps = steps_for()
    ref, token = _admit_one(steps)
    redis_now = steps.store.now()
    monkeypatch.setattr(time, "time", lambda: redis_now + 3600)

    steps.claim(ref, token, "submit")

    lease_until = steps.store.redis.zscore("vidq:due", ref)
    assert abs(lease_until - (redis_now + steps.settings.step_grace_s)) < 5


def test_a_second_generation_id_for_a_job_becomes_its_own_job_and_is_polled(steps_for):
    """An old POST answering after a resubmit: its generation is paid for, so it is kept
    as a sibling job, due for a poll, holding a slot, never left in an unread field."""
    steps = steps_for()
    ref, token = _admit_one(steps)
    job = steps.claim(ref, token, "submit")
    steps.store.record_generation(job, "gen-first", 5)

    steps.store.record_generation(job, "gen-late", 5)

    sibling = steps.store.get(ref + "~2")
    assert sibling.generation_id == "gen-late" and sibling.state == "submitted"
    assert steps.store.redis.zscore("vidq:due", sibling.ref) is not None
    assert steps.admission.in_flight() == 2
    assert steps.store.job_ids("b") == ["j1", "j1~2"]


def test_an_outcome_unknown_job_keeps_its_slot_until_the_deadline_before_any_fit(steps_for):
    """Nothing learned yet: the prior may be far off, so the slot of a POST that
    may be generating is held until the deadline, not one prior's wait."""
    steps = steps_for(VIDQ_EXPECTED_GENERATION_S="0.2", VIDQ_DEADLINE_S="1")
    ref, token = _admit_one(steps)
    job = steps.claim(ref, token, "submit")

    steps.fail(job, "outcome_unknown: the answer was lost")

    assert steps.store.get(ref).state == "failed"
    assert steps.store.outcome_unknown("b") == 1
    time.sleep(0.5)  # past the prior
    assert steps.admission.in_flight() == 1 and steps.admission.release_expired_holds() == 0
    time.sleep(0.7)
    assert steps.admission.release_expired_holds() == 1
    assert steps.admission.in_flight() == 0


def test_an_unknown_posts_hold_lasts_while_a_job_admitted_before_it_still_runs(steps_for):
    """The fit that set an unknown POST's hold may be stale (generations just
    got slower): while a job admitted before it still holds its slot, the
    unknown POST, if it created anything, is likely generating too, and its
    slot stays taken; once that job is done, or VIDQ_DEADLINE_S after its
    admission, the hold ends. (A job admitted after them all is done here:
    without one, the hold stays too; test_admission.py's slower upstream.)"""
    steps = steps_for(VIDQ_DEADLINE_S="3")
    steps.admission.enqueue("b", [(f"j{i}", {"model": "alibaba/wan2.1-t2v-turbo",
                                             "prompt": f"p {i}"}) for i in range(3)],
                            time.time())
    (old, _), (unknown, _), (done, _) = steps.admission.pump()
    for ref in (unknown, done):  # their holds ran out; the first job still runs
        steps.store.redis.zadd(keys.SLOT_HOLDS, {ref: time.time() - 1})
    now = time.time()  # admitted in this order (one pump gives them one time)
    steps.store.redis.zadd(keys.SLOTS, {done: now - 2.0, old: now - 1.5, unknown: now - 1.0})
    steps.store.redis.hset(keys.CONFIG, "done_slot_taken", repr(now - 0.5))

    assert steps.admission.release_expired_holds(recheck_s=0.2) == 1
    assert set(steps.store.redis.zrange(keys.SLOTS, 0, -1)) == {old, unknown}
    time.sleep(0.3)
    assert steps.admission.release_expired_holds(recheck_s=0.2) == 0  # still running
    steps.store.redis.zrem(keys.SLOTS, old)  # done
    time.sleep(0.3)
    assert steps.admission.release_expired_holds(recheck_s=0.2) == 1
    assert steps.admission.in_flight() == 0

    steps.store.redis.zadd(keys.SLOTS, {old: time.time() - 10, unknown: time.time() - 3.1})
    steps.store.redis.zadd(keys.SLOT_HOLDS, {unknown: time.time() - 1})
    assert steps.admission.release_expired_holds() == 1  # past VIDQ_DEADLINE_S: ends
    steps.store.redis.delete(keys.SLOTS)


def test_unknown_posts_holding_every_slot_end_at_their_expiry(steps_for):
    """Every slot held by an unknown POST (a gateway's 502s to C POSTs in a
    row): no job can be admitted after them, so waiting for one to be seen
    done stalled the night until VIDQ_DEADLINE_S (review 115). With a job
    running after them and none done, they stay; with none running, they end."""
    steps = steps_for(VIDQ_DEADLINE_S="30")
    steps.admission.enqueue("b", [(f"j{i}", {"model": "alibaba/wan2.1-t2v-turbo",
                                             "prompt": f"p {i}"}) for i in range(3)],
                            time.time())
    (first, _), (second, _), (later, _) = steps.admission.pump()
    now = time.time()
    steps.store.redis.zadd(keys.SLOTS, {first: now - 3.0, second: now - 3.0, later: now - 1.0})
    steps.store.redis.zadd(keys.SLOT_HOLDS, {first: now - 0.5, second: now - 0.5})

    assert steps.admission.release_expired_holds(recheck_s=0.2) == 0  # `later` runs
    steps.store.redis.zrem(keys.SLOTS, later)  # every slot left is a hold
    time.sleep(0.3)
    assert steps.admission.release_expired_holds(recheck_s=0.2) == 2
    assert steps.admission.in_flight() == 0


def test_only_a_generation_posted_in_its_slot_says_the_upstream_is_past_a_hold(steps_for):
    """`vidq retry` (and a generation found again) takes a slot now for a
    generation POSTed long before: its completion says nothing of how long
    generations take now, and must not end an unknown POST's hold admitted
    before that slot (review 115). One POSTed in its slot does."""
    steps = steps_for()
    config = steps.store.redis
    for posted_after_admission in (False, True):
        config.hdel(keys.CONFIG, "done_slot_taken")
        ref, token = _admit_one(steps, job_id=f"j{posted_after_admission}")
        taken = config.zscore(keys.SLOTS, ref)
        config.hset(keys.job(ref), "posting_at",
                    repr(taken + 0.5 if posted_after_admission else taken - 600))
        job = steps.claim(ref, token, "submit")
        steps.store.transition(job, state="downloading", release_slot=True)
        recorded = config.hget(keys.CONFIG, "done_slot_taken")
        assert (recorded is not None) == posted_after_admission, recorded


def test_a_429_to_a_purged_generations_look_pauses_polls_and_keeps_its_slot(steps_for,
                                                                            make_sandbox):
    """Purged generations whose hold ran out are asked about: a 429 counted
    as "still running" and the looks went on, 3 GETs every 10 s into the
    limit with no pause (review 118). It pauses status GETs for every worker,
    as a poll's 429 does, and ends the pass; the slot stays held."""
    import requests

    from worker.purged_looks import look_at_purged_generations

    sandbox = make_sandbox()
    steps = steps_for(sandbox)
    client = steps.store.redis
    ref, token = _admit_one(steps)
    submitted = _run(steps, "submit", ref, token)
    name = f"{ref}#{submitted.generation_id}"
    client.zadd(keys.SLOTS, {name: time.time() - 5})
    client.zadd(keys.SLOT_HOLDS, {name: time.time() - 1})
    client.hset(keys.PURGED_GENERATIONS, name, submitted.generation_id)
    requests.post(sandbox.url + "/__faults", json={"poll": [429], "retry_after": 30},
                  timeout=10).raise_for_status()

    assert look_at_purged_generations(steps.admission, steps.client.fetch,
                                      steps.store.pause_polls, lambda: None, 0.0) == 0
    assert client.pttl(keys.PAUSE_POLL) > 25_000
    assert client.hget(keys.PURGED_GENERATIONS, name) == submitted.generation_id
    assert steps.admission.release_expired_holds() == 0  # left to its next look
    assert client.zscore(keys.SLOTS, name) is not None


def test_a_purged_generations_hold_outlasts_404s_and_ends_with_its_generation(steps_for,
                                                                               make_sandbox):
    """Review 119: one 404 to a purged generation's look (a gateway's hiccup)
    ended its hold while it ran: both slots of two running generations
    freed, 4 in flight at C = 2. A 404 now asks again later, as any error.
    And a look that found it ended only dropped it from the looks: its hold
    was then judged as an unknown POST's and kept while a later job ran,
    the slot idle for a generation. It ends in the same step, and the free
    slot is filled at once."""
    import requests

    from worker.purged_looks import look_at_purged_generations

    sandbox = make_sandbox(time_scale=30)  # 3 s generations
    steps = steps_for(sandbox)
    client = steps.store.redis
    ref, token = _admit_one(steps)
    generation_id = _run(steps, "submit", ref, token).generation_id
    name = f"{ref}#{generation_id}"
    client.zadd(keys.SLOTS, {name: time.time() - 5})
    client.zadd(keys.SLOT_HOLDS, {name: time.time() - 1})
    client.hset(keys.PURGED_GENERATIONS, name, generation_id)
    later_ref, _ = _admit_one(steps, prompt="a later heron", job_id="j2")  # runs after the hold
    filled = []

    def look() -> int:
        return look_at_purged_generations(steps.admission, steps.client.fetch,
                                          steps.store.pause_polls, lambda: filled.append(1), 0.0)

    requests.post(sandbox.url + "/__faults", json={"poll": [404, 410]},
                  timeout=10).raise_for_status()
    for _ in range(2):
        assert look() == 0
        assert client.zscore(keys.SLOTS, name) is not None
        client.zadd(keys.SLOT_HOLDS, {name: time.time() - 1})
    wait_until(lambda: steps.client.fetch(generation_id).succeeded, 30, "generation done")
    assert look() == 1 and filled == [1]
    steps.admission.release_expired_holds()
    assert client.zscore(keys.SLOTS, name) is None
    assert client.zscore(keys.SLOT_HOLDS, name) is None
    assert client.hget(keys.PURGED_GENERATIONS, name) is None
    assert client.zscore(keys.SLOTS, later_ref) is not None


def test_a_purged_generation_slower_than_the_deadline_keeps_its_slot_while_it_runs(
        steps_for, make_sandbox):
    """Review 121: the looks kept a running purged generation's hold, but the
    hold still ended `VIDQ_DEADLINE_S` after its admission: a generation
    slower than that lost its slot while it ran, 4 in flight at C = 2. It is
    kept to the hard limit while the upstream says it runs, as a polled
    job's slot; past the deadline, 404s end it only as they give up a polled
    job's slot: three in a row, over `VIDQ_BACKOFF_CAP_S` (review 123: three
    in 20 s did, and a count kept per process ran on over another worker's
    "running" answer)."""
    from worker.purged_looks import look_at_purged_generations

    sandbox = make_sandbox(time_scale=1, mean_generation_s=600)
    steps = steps_for(sandbox, VIDQ_DEADLINE_S="20", VIDQ_HARD_LIMIT_S="60")
    client = steps.store.redis
    ref, token = _admit_one(steps)
    generation_id = _run(steps, "submit", ref, token).generation_id
    name = f"{ref}#{generation_id}"
    client.zadd(keys.SLOTS, {name: time.time() - 30})  # past the deadline, short of the limit
    client.hset(keys.PURGED_GENERATIONS, name, generation_id)

    def look(*not_found: int, over_s: float = 2.0) -> int:
        if not_found:
            requests.post(sandbox.url + "/__faults", json={"poll": list(not_found)},
                          timeout=10).raise_for_status()
        client.zadd(keys.SLOT_HOLDS, {name: time.time() - 1})  # its hold ran out
        released = steps.admission.release_expired_holds()  # an admission first, say
        return released + look_at_purged_generations(steps.admission, steps.client.fetch,
                                                      steps.store.pause_polls, lambda: None,
                                                      over_s)

    assert look() == 0  # running
    # Two 404s, "running", two 404s: never three in a row.
    assert [look(404, over_s=0), look(404, over_s=0), look(over_s=0), look(410, over_s=0),
            look(404, over_s=0)] == [0, 0, 0, 0, 0]
    assert look(404) == 0  # three in a row, not over 2 s yet
    assert client.zscore(keys.SLOTS, name) is not None
    time.sleep(2)
    assert look(404) == 1
    assert client.zscore(keys.SLOTS, name) is None
    assert not client.exists(keys.PURGED_NOT_FOUND, keys.PURGED_GENERATIONS)

    client.zadd(keys.SLOTS, {name: time.time() - 61})  # past the hard limit: no look keeps it
    client.hset(keys.PURGED_GENERATIONS, name, generation_id)
    client.zadd(keys.SLOT_HOLDS, {name: time.time() - 1})
    assert steps.admission.release_expired_holds() == 1


def test_a_resubmit_that_takes_back_a_generation_counts_its_video_by_how_it_ends(
        steps_for, make_sandbox):
    """`retry --resubmit` took back the earlier generation (a 404 short of the
    hard limit, so it is polled): settled as 'stored' on the spot, its video
    kept counting against the batch's max-videos after it failed, and the
    next `--resubmit` waited on a spend cap for a video that never came
    (review 123). Nothing is spent twice, and its end decides."""
    import requests

    sandbox = make_sandbox(time_scale=1, mean_generation_s=600)
    steps = steps_for(sandbox)
    client = steps.store.redis
    ref, token = _admit_one(steps)
    generation_id = _run(steps, "submit", ref, token).generation_id
    requests.post(sandbox.url + "/__forget", json={"id": generation_id},
                  timeout=10).raise_for_status()
    steps.fail(steps.store.get(ref), "poll: timeout: still 'queued' (hard limit)")
    spent = float(client.hget(keys.batch("b"), "credits_spent"))
    assert spent > 0 and client.hget(keys.batch("b"), "videos") == "0"

    assert steps.admission.requeue_failed("b", resubmit=True) == {"resubmitted": 1}
    ((ref, token),) = steps.admission.pump()
    assert _run(steps, "submit", ref, token).generation_id == generation_id  # taken back
    batch = client.hgetall(keys.batch("b"))
    assert (batch["videos"], float(batch["credits_committed"]), float(batch["credits_spent"])) \
        == ("1", 0.0, spent)
    steps.fail(steps.store.get(ref), "poll: timeout: still 'queued' (hard limit)")
    batch = client.hgetall(keys.batch("b"))
    assert (batch["videos"], float(batch["credits_committed"]), float(batch["credits_spent"])) \
        == ("0", 0.0, spent)


def test_a_plain_retry_counts_the_video_it_fetches_against_max_videos(steps_for, make_sandbox):
    """A job failed at the hard limit while its generation ran: its video went
    back to the batch's max-videos. `vidq retry` polled it again and stored
    the video, which the count never took back: 1 video stored, 0 counted,
    and one more admitted past the cap (review 125)."""
    sandbox = make_sandbox(time_scale=30)  # 3 s generations
    steps = steps_for(sandbox)
    client = steps.store.redis
    ref, token = _admit_one(steps)
    _run(steps, "submit", ref, token)
    steps.fail(steps.store.get(ref), "timeout: still 'generating' (hard limit)")
    assert client.hget(keys.batch("b"), "videos") == "0"

    from worker.retry import failures, retry, select

    assert retry(steps.admission, steps.dispatch, "b", select(failures(steps.store, "b"))
                 ).requeued == 1  # what `vidq retry b` runs
    assert client.hget(keys.batch("b"), "videos") == "1"
    assert reconcile(steps.admission, steps.dispatch, 10.0) == 1  # polled at once
    step, _, token = steps.sent[-1]
    token = _until_completed(steps, ref, token, first=step)
    assert _run(steps, "download", ref, token).state == "done"
    batch = client.hgetall(keys.batch("b"))
    assert (batch["videos"], float(batch["credits_committed"])) == ("1", 0.0)


def test_a_poll_of_a_job_with_no_generation_id_leaves_it(steps_for):
    """Once everysec lost a second, the token counter went back: a number
    issued again for a job waiting for its POST's record met a poll message
    from before the crash with the same number. The poll asked for no id
    (HTTP 400: generation_id is required) and failed the paid job while its
    answer was being recorded again (seen once in a CI run of
    test_everysec_redis). Such a poll is stale: nothing changes."""
    steps = steps_for()
    ref, token = _admit_one(steps)
    job = steps.claim(ref, token, "poll")
    steps.poll(job)
    after = steps.store.get(ref)
    assert after.state != "failed" and not after.extra.get("last_error")
    assert steps.sent == []


def test_a_claimed_step_is_never_re_sent_for_a_newer_stale_message(steps_for):
    """After Redis lost a second, its token counter re-issues numbers: a job
    re-sent since may run a step under a lower token than a message from
    before the crash. That message must not make the running step due again
    (a second copy of it; review 115): only a waiting job is taken to have
    lost its writes."""
    steps = steps_for()
    ref, token = _admit_one(steps)
    job = steps.claim(ref, token, "submit")
    leased = steps.store.redis.zscore(keys.DUE, ref)

    assert steps.claim(ref, str(int(token) + 5), "submit") is None
    assert steps.store.redis.zscore(keys.DUE, ref) == leased
    assert steps.store.get(ref).token == f"run:{token}" and job is not None


def test_a_job_admitted_with_an_unknown_post_keeps_its_hold_while_it_runs(steps_for):
    """One pump call admits both jobs, so both slots have one score, here one
    whose 14-digit rounding falls below it: the job still running counts as
    no younger than the unknown POST, and its hold stays."""
    steps = steps_for(VIDQ_DEADLINE_S="30")
    steps.admission.enqueue("b", [(f"j{i}", {"model": "alibaba/wan2.1-t2v-turbo",
                                             "prompt": f"p {i}"}) for i in range(2)],
                            time.time())
    (running, _), (unknown, _) = steps.admission.pump()
    one_pump = int(time.time()) - 1 + 0.954546  # %.14g: ....9545, below it
    steps.store.redis.zadd(keys.SLOTS, {running: one_pump, unknown: one_pump})
    steps.store.redis.zadd(keys.SLOT_HOLDS, {unknown: time.time() - 1})

    assert steps.admission.release_expired_holds() == 0
    assert steps.admission.in_flight() == 2


def test_one_unreadable_record_does_not_stop_the_reconcilers_pass(steps_for):
    from worker.recovery import reconcile

    steps = steps_for()
    steps.admission.enqueue("b", [(f"j{i}", {"model": "m", "prompt": f"p{i}"}) for i in range(3)],
                            time.time())
    admitted = steps.admission.pump()
    client = steps.store.redis
    client.hset("vidq:job:" + admitted[0][0], "request", "{not json")
    for ref, _ in admitted:
        client.zadd("vidq:due", {ref: 0})  # all three look lost
    steps.admission.enqueue("b", [("j9", {"model": "m", "prompt": "waiting"})], time.time())
    client.zrem("vidq:slots", admitted[2][0])  # and a slot is free for the waiting one

    resent = reconcile(steps.admission, steps.dispatch, steps.settings.step_grace_s)

    assert resent == 2
    assert [s for s in steps.sent if s[1] == "b:j9"]  # the pump still ran
    assert client.zscore("vidq:due", admitted[0][0]) > steps.store.now()


def test_an_outcome_unknown_failure_that_races_a_recorded_id_does_not_fail_the_job(steps_for):
    """The POST thread recorded the id just as the step gave up waiting: the job is not
    failed; its lease expires and the reconciler sends the poll."""
    steps = steps_for()
    ref, token = _admit_one(steps)
    job = steps.claim(ref, token, "submit")
    steps.store.record_generation(job, "gen-just-in-time", 5)

    steps.fail(job, "outcome_unknown: no complete answer within 60 s")

    record = steps.store.get(ref)
    assert record.state == "submitted" and record.generation_id == "gen-just-in-time"
    assert steps.store.outcome_unknown("b") == 0
    assert steps.store.redis.zscore("vidq:due", ref) is not None


def test_pending_first_polls_are_re_aimed_when_generations_get_faster(steps_for,
                                                                       make_sandbox):
    """Learned at ~20 s, three jobs get first polls at ~18 s; then eight first polls in a row
    find their video done (the upstream got faster): the three pending first polls get
    new tokens at the new, earlier aim, and their old messages become no-ops."""
    from worker.reaim import aim_dropped, reaim_first_polls
    from worker.schedule import TOO_LATE_RUN

    steps = steps_for(make_sandbox(time_scale=45), VIDQ_EXPECTED_GENERATION_S="90")
    shape = ("alibaba/wan2.1-t2v-turbo", "720P")
    for done_at in (19, 20, 21, 20, 19.5, 20.5):
        steps.durations.record(*shape, done_at - 1, done_at)
    steps.admission.enqueue("b", [(f"j{i}", {"model": shape[0], "prompt": f"boat {i}"})
                                  for i in range(3)], time.time())
    old = {}
    for ref, token in steps.admission.pump():
        steps.submit(steps.claim(ref, token, "submit"))
        _, _, old[ref] = steps.sent[-1]
        assert 17 < steps.store.get(ref).number("first_aim") < 20
    assert not aim_dropped(steps.store.redis, *shape, steps.durations.plan(*shape).first_s)

    for _ in range(TOO_LATE_RUN):
        steps.durations.record(*shape, 0.0, 2.0)
    first_s = steps.durations.plan(*shape).first_s
    assert first_s == 1.0 and aim_dropped(steps.store.redis, *shape, first_s)
    steps.sent.clear()
    assert reaim_first_polls(steps.store, steps.dispatch, shape, first_s, 0.1, 5.0) == 3

    assert sorted(ref for _, ref, _ in steps.sent) == sorted(old)
    for step, ref, token in steps.sent:
        assert step == "poll" and token != old[ref]
        assert steps.claim(ref, old[ref], "poll") is None  # the old countdown does nothing
        assert steps.store.get(ref).number("first_aim") == 1.0
    assert reaim_first_polls(steps.store, steps.dispatch, shape, first_s, 0.1, 5.0) == 0


def test_an_id_landing_just_after_the_post_step_gave_up_is_still_polled(steps_for, make_sandbox):
    """The POST answers 0.3 s after its 1 s deadline, while the step is still on its
    way to failing the job 'outcome unknown' (made 1 s long here): the failure does
    not land on the paid job; it keeps its lease, and the reconciler sends its poll."""
    from chaos.faultproxy import FaultProxy

    from worker.tasks import _run as run_task

    sandbox = make_sandbox()
    proxy = FaultProxy(sandbox.url, seed=3, rewrite_urls=True, slow_s=1.3).start()
    try:
        steps = steps_for(sandbox, AIMLAPI_BASE_URL=proxy.url, VIDQ_POST_DEADLINE_S="1",
                          VIDQ_HTTP_TIMEOUT_S="5", VIDQ_STEP_GRACE_S="7")
        ref, token = _admit_one(steps)
        proxy.queue("slow_headers", count=1, method="POST")
        plan = steps.durations.plan
        steps.durations.plan = lambda *a, **k: (time.sleep(1.0), plan(*a, **k))[1]

        run_task(steps, "submit", steps.claim(ref, token, "submit"))
        record = steps.store.get(ref)
        steps.store.redis.zadd("vidq:due", {ref: 0})  # its lease, run out
        reconcile(steps.admission, steps.dispatch, steps.settings.step_grace_s)
    finally:
        proxy.stop()

    assert record.state != "failed" and record.generation_id, record.extra
    assert steps.sent[-1][:2] == ("poll", ref)


def test_a_late_refusal_undoes_only_its_own_attempts_booking(steps_for):
    """POST A fails 'outcome unknown' (booked: it may have been charged), is re-POSTed
    as B, B fails unknown too, then B is refused late: only B's booking is undone;
    A's stays counted."""
    from worker.retry import requeue

    steps = steps_for()
    ref, token = _admit_one(steps)
    batch_key = f"vidq:batch:{ref.split(':')[0]}"
    spent = []
    for attempt in ("A", "B"):
        job = steps.claim(ref, token, "submit")
        assert mark_posting(steps.store, job, steps.durability) == "ok"
        steps.fail(job, f"outcome_unknown: {attempt}'s answer was lost")
        spent.append(float(steps.store.redis.hget(batch_key, "credits_spent")))
        if attempt == "A":
            assert requeue(steps.admission, steps.dispatch, "b", ["j1"],
                           resubmit_unknown=True) == {"resubmitted": 1}
            token = steps.sent[-1][2]
    assert steps.store.clear_posting(job)  # B's own refusal, matched to its marker

    assert steps.store.undo_unknown(job, "submit: HTTP 400 (late)") == "undone"
    left = float(steps.store.redis.hget(batch_key, "credits_spent"))
    assert spent[1] == 2 * spent[0] > 0 and left == spent[0]
    assert float(steps.store.get(ref).extra["credits"]) == spent[0]


@pytest.mark.parametrize("rate_limited", [True, False], ids=["429", "paused"])
def test_a_submit_put_back_after_an_earlier_posts_id_landed_is_polled(steps_for,
                                                                       rate_limited):
    """A re-POST (after --resubmit-unknown) meets a 429 or a pause, but the earlier
    POST's late id landed meanwhile: the paid job keeps a slot and is polled, not put
    in a line that admits only queued jobs (where it was lost, holding no slot)."""
    steps = steps_for()
    ref, token = _admit_one(steps)
    job = steps.claim(ref, token, "submit")
    steps.store.record_generation(job, "gen-of-an-earlier-post", 30.0)

    steps.store.back_in_line(job, 5.0 if rate_limited else 0.0, rate_limited=rate_limited)
    steps.store.redis.zadd("vidq:due", {ref: 0})
    reconcile(steps.admission, steps.dispatch, steps.settings.step_grace_s)

    client = steps.store.redis
    assert client.zrange("vidq:batch:b:line", 0, -1) == []
    assert client.zscore("vidq:slots", ref) is not None
    assert steps.sent[-1][:2] == ("poll", ref)
    # A 429 still counts toward finding the account's real limit.
    assert (client.hget("vidq:config", "last_429_at") is not None) == rate_limited


@pytest.fixture(scope="module")
def real_mp4(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    render_clip(path, 320, 240)
    return path.read_bytes()


def _serve(handler: type[BaseHTTPRequestHandler]) -> tuple[str, ThreadingHTTPServer]:
    """A local result URL answered by `handler`."""
    handler.log_message = lambda self, *args: None  # type: ignore[method-assign]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}/v.mp4", server


def _download_from(steps, redis_url, url):
    """Claim the download step of a job whose result is `url`."""
    ref, token = _admit_one(steps)
    redis.Redis.from_url(redis_url).hset("vidq:job:" + ref, mapping={
        "video_url": url, "state": "downloading"})
    return steps.claim(ref, token, "download")


def _answering(body: bytes, length: bool = True, piece: int = 0, every_s: float = 0.0,
               headers: dict | None = None, seen: list | None = None):
    """A handler answering 200 with `body`: with its Content-Length or ended by a
    close, sent whole or `piece` bytes every `every_s`, with extra `headers`."""
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self):
            if seen is not None:
                seen.append(self.headers.get("Accept-Encoding"))
            self.send_response(200)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for start in range(0, len(body), piece or len(body)):
                    self.wfile.write(body[start:start + (piece or len(body))])
                    self.wfile.flush()
                    time.sleep(every_s)
            except OSError:
                pass  # vidq hung up

    return Handler


@pytest.mark.parametrize("with_length", [False, True], ids=["closed", "cached_cut"])
def test_a_video_cut_short_without_an_http_error_is_refused(steps_for, redis_url, real_mp4,
                                                            tmp_path, with_length):
    """60% of a real MP4, ended by a close or by a matching Content-Length: its
    last box is unfinished, so CorruptVideo (retried), nothing published."""
    url, server = _serve(_answering(real_mp4[:len(real_mp4) * 6 // 10], length=with_length))
    steps = steps_for()
    try:
        with pytest.raises(CorruptVideo, match="cut inside an MP4 box"):
            steps.download(_download_from(steps, redis_url, url))
    finally:
        server.shutdown()
    assert not any(tmp_path.rglob("*.mp4")) and not any(tmp_path.rglob("*.part"))


FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from worker.errors import StorageError
from worker.storage import FileStorage
from worker.video import stream_video

video = Path(sys.argv[1]).read_bytes()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG), as ENOSPC would
resource.setrlimit(resource.RLIMIT_FSIZE, (len(video) // 2, len(video) // 2))
chunks = (video[i:i + 4096] for i in range(0, len(video), 4096))
try:
    stream_video(FileStorage(Path(sys.argv[2])), "b/j.mp4", chunks, None)
except StorageError as exc:
    print("StorageError:", exc)
"""


def test_a_full_disk_is_a_storage_error_even_when_the_close_fails_again(real_mp4, tmp_path):
    """The kernel refuses a write half-way (RLIMIT_FSIZE, like a full disk); the
    buffer still holds bytes, so the close's flush fails too. That second
    failure used to escape as a bare OSError, which a download does not retry:
    a paid video given up after 8 attempts. It is a StorageError, retried."""
    source = tmp_path / "clip.mp4"
    source.write_bytes(real_mp4)
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(source), str(tmp_path / "s")],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("StorageError: cannot write"), result.stdout + result.stderr
    assert not any((tmp_path / "s").rglob("*.mp4")) and not any((tmp_path / "s").rglob("*.part"))


def test_a_gzipped_video_with_its_wire_length_is_stored_whole(steps_for, redis_url, real_mp4,
                                                             tmp_path):
    """vidq asks for the file as is (Accept-Encoding: identity); a server that
    gzips anyway, with the compressed Content-Length, is still stored whole.
    It used to fail every attempt: the decoded bytes never matched the wire's length."""
    seen: list = []
    url, server = _serve(_answering(gzip.compress(real_mp4), headers={"Content-Encoding": "gzip"},
                                    seen=seen))
    try:
        steps = steps_for()
        steps.download(_download_from(steps, redis_url, url))
    finally:
        server.shutdown()
    assert seen == ["identity"]
    stored = (tmp_path / "b" / "j1.mp4").read_bytes()
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(real_mp4).hexdigest()


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    """A pool child SIGKILLed mid-write leaves `.j1.mp4.<random>.part`. The
    next write of that video removes one untouched for an hour as it starts,
    not a live one (that writer may still own the job); once the video is
    published, every other part of it goes (their writers lost the job), but
    not the part of another key whose name starts with this one's (job id
    `j1.mp4`; review 110)."""
    (tmp_path / "b").mkdir()
    other_key = tmp_path / "b" / ".j1.mp4.mp4.abcd1234.part"
    other_key.write_bytes(b"\0" * 1000)
    dead, live = tmp_path / "b" / ".j1.mp4.dead1234.part", tmp_path / "b" / ".j1.mp4.live5678.part"
    dead.write_bytes(b"\0" * 1000)
    live.write_bytes(b"\0" * 1000)
    os.utime(dead, (time.time() - 7200, time.time() - 7200))
    with FileStorage(tmp_path).writer("b/j1.mp4") as out:
        out.write(b"a video")
        assert not dead.exists() and live.exists()
    assert not live.exists() and (tmp_path / "b" / "j1.mp4").read_bytes() == b"a video"
    assert other_key.exists()


def test_a_result_that_trickles_ends_the_attempt_instead_of_holding_a_worker(
        steps_for, redis_url, real_mp4):
    """A result URL sending a byte every 0.1 s (never quiet long enough for the
    read timeout) used to hold the download, and its worker process, with no
    bound. Under 1,000 bytes/s over a third of the download grace (1 s here)
    the attempt ends as UpstreamUnavailable, to be tried again later."""
    url, server = _serve(_answering(real_mp4, piece=1, every_s=0.1))
    steps = steps_for(VIDQ_DOWNLOAD_GRACE_S="3")
    job = _download_from(steps, redis_url, url)
    outcome: list = []

    def download():
        try:
            steps.download(job)
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test reads
            outcome.append(exc)

    runner = threading.Thread(target=download, daemon=True)
    runner.start()
    runner.join(timeout=20)
    server.shutdown()
    assert not runner.is_alive(), "the download still holds its worker after 20 s"
    assert isinstance(outcome[0], UpstreamUnavailable) and "bytes/s" in str(outcome[0])


def test_a_result_just_above_the_stall_floor_is_still_bounded(steps_for, redis_url, real_mp4):
    """1,500 bytes/s passes the 1,000 bytes/s floor, and used to hold the
    download for as long as it trickled. An attempt may take three download
    graces, or its Content-Length at 10 kB/s if longer: here 3 s for 20 kB."""
    url, server = _serve(_answering(real_mp4[:20_000], piece=150, every_s=0.1))
    steps = steps_for(VIDQ_DOWNLOAD_GRACE_S="1")
    started = time.monotonic()
    try:
        with pytest.raises(UpstreamUnavailable, match="on average"):
            steps.download(_download_from(steps, redis_url, url))
    finally:
        server.shutdown()
    assert time.monotonic() - started < 8


def test_a_video_with_a_few_bytes_of_padding_is_stored(steps_for, redis_url, real_mp4,
                                                      tmp_path):
    """Four zero bytes after the last box (too few for a box) are padding, not a
    cut: refused, the paid video would be retried until the hard limit and lost."""
    url, server = _serve(_answering(real_mp4 + b"\0\0\0\0"))
    try:
        steps = steps_for()
        steps.download(_download_from(steps, redis_url, url))
    finally:
        server.shutdown()
    assert (tmp_path / "b" / "j1.mp4").read_bytes() == real_mp4 + b"\0\0\0\0"


def _submit_then_redis_blip(steps, ref: str, token: str) -> None:
    """Run the submit, with Redis failing once right after the POST answered
    (the poll plan is read then), on the job's last attempt."""
    from worker.tasks import JobFailed, run_step

    planned = steps.durations.plan

    def blip(*_args):
        raise redis.ConnectionError("Connection reset by peer (a Redis blip)")

    steps.durations.plan = blip
    try:
        with contextlib.suppress(JobFailed):
            run_step(steps, "submit", ref, token)
    finally:
        steps.durations.plan = planned


def test_a_submit_that_fails_after_its_post_answered_keeps_its_slot_and_video(
        steps_for, make_sandbox):
    """Review 133: on its last attempt a submit got its id, then Redis failed
    before the step handed the job on. Counted as unpaid (a submit step),
    the job failed and freed its slot while its generation ran: the next job
    was admitted, two generations at C = 1, and the paid video never fetched.
    Now it is tried again like any paid job: polled, downloaded, one slot."""
    from worker.tasks import JobFailed, run_step

    sandbox = make_sandbox(time_scale=1, mean_generation_s=2, spread=0, max_concurrency=5)
    steps = steps_for(sandbox, VIDQ_MAX_ATTEMPTS="1")
    steps.admission.set_cap(1)
    model = "alibaba/wan2.1-t2v-turbo"
    steps.admission.enqueue("b", [("j1", {"model": model, "prompt": "first"}),
                                  ("j2", {"model": model, "prompt": "second"})], time.time())
    [(ref, token)] = steps.admission.pump()
    _submit_then_redis_blip(steps, ref, token)

    job = steps.store.get(ref)
    assert job.state != "failed" and job.generation_id, job.last_error
    assert steps.store.redis.zrange(keys.SLOTS, 0, -1) == [ref]
    assert [sent_ref for _, sent_ref, _ in steps.sent] == [ref]  # j2 not admitted
    deadline = time.monotonic() + 30
    while steps.store.get(ref).state != "done":
        assert time.monotonic() < deadline, steps.store.get(ref).state
        time.sleep(0.2)
        step, _, token = [sent for sent in steps.sent if sent[1] == ref][-1]
        with contextlib.suppress(JobFailed):
            run_step(steps, step, ref, token)
    assert steps.store.get(ref).extra["sha256"] and sandbox.stats()["submissions"] == 1


def test_a_resubmit_that_fails_after_its_post_answered_keeps_its_slot(steps_for, make_sandbox):
    """The same blip after the POST, for a `vidq retry --resubmit` of a
    generation that timed out at the hard limit: the step still held the
    retired generation's submit time and measured the new one's hard limit
    from it, failing it as above (review 134)."""
    from producer.retrying import run_retry
    from worker.tasks import JobFailed, run_step

    sandbox = make_sandbox(time_scale=1, mean_generation_s=30, spread=0, max_concurrency=5)
    steps = steps_for(sandbox, VIDQ_MAX_ATTEMPTS="1", VIDQ_DEADLINE_S="1", VIDQ_HARD_LIMIT_S="2")
    ref, token = _admit_one(steps)
    run_step(steps, "submit", ref, token)
    retired = steps.store.get(ref).generation_id
    time.sleep(2.2)  # past the hard limit: the poll fails it "timeout"
    with contextlib.suppress(JobFailed):
        run_step(steps, "poll", ref, steps.sent[-1][2])
    assert steps.store.get(ref).last_error.startswith("timeout")
    run_retry(steps.admission, steps.dispatch, "b", resubmit=True, yes=True,
              echo=lambda _: None)
    admitted = dict(steps.admission.pump())  # (the retry may have admitted it already)
    token = admitted.get(ref) or [sent[2] for sent in steps.sent if sent[1] == ref][-1]
    _submit_then_redis_blip(steps, ref, token)

    job = steps.store.get(ref)
    assert job.generation_id not in ("", retired) and job.state != "failed", job.last_error
    assert ref in steps.store.redis.zrange(keys.SLOTS, 0, -1)
    assert sandbox.stats()["submissions"] == 2
