"""Batch operations on real parts: retry (and --resubmit), manifest, status,
purge and retention, --allow-variants. Real Redis, real `celery -A worker
worker` processes, the sandbox over HTTP; `vidq` run as a user runs it."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pty
import re
import subprocess
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
from conftest import wait_until, write_prompts

from producer.purging import run_purge
from worker import keys
from worker.jobs import Job, State
from worker.retry import failures

GOOD = ["a red fox in the snow", "a blue whale at dawn", "a green frog on a leaf"]
REJECTED = ["REJECT a burning car", "REJECT a crowd at night"]
LONELY = "a lonely lighthouse in fog"


def vidq(pipeline, *args, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    env = {**os.environ, "VIDQ_REDIS_URL": pipeline.settings.redis_url,
           "VIDQ_STORAGE_URL": pipeline.env["VIDQ_STORAGE_URL"]}
    return subprocess.run(["vidq", *args], env=env, capture_output=True, text=True,
                          timeout=120, stdin=stdin)


def report(pipeline, batch: str, *args) -> list[dict]:
    result = vidq(pipeline, "report", batch, *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def mark_failed(store, batch: str, job_id: str, reason: str) -> None:
    job = store.get(keys.job_ref(batch, job_id))
    store.transition(job, state=State.FAILED, expected_token="*", last_error=reason)


@pytest.mark.slow
def test_retry_polls_by_default_and_resubmit_posts_exactly_one_new_generation_per_job(
        make_pipeline, make_sandbox, tmp_path):
    """Given 2 jobs failed upstream (with generation ids) and 1 whose POST had an
    unknown outcome: `vidq retry` polls the 2 again (no new POST) and leaves the
    unknown one; `--resubmit` without a terminal refuses without --yes; with
    --yes each failed job is POSTed exactly once more (sandbox ledger), its old id
    kept in its history, and every video lands."""
    first = make_pipeline()
    first.start_workers()
    first.faults(submit=[502])  # the lighthouse's POST: answer lost, outcome unknown
    first.enqueue(write_prompts(tmp_path / "a.txt", [LONELY]), "night")
    first.wait_finished("night")
    first.enqueue(write_prompts(tmp_path / "b.txt", GOOD + REJECTED), "night")
    assert first.wait_finished("night") == {**first.store.counts("night"), "done": 3,
                                            "failed": 3}

    store = first.store
    rejected = [job_id for job_id in store.job_ids("night")
                if "REJECT" in store.get(keys.job_ref("night", job_id)).request["prompt"]]
    store.pause_polls(10)  # the second command comes before their polls
    polled = vidq(first, "retry", "night")
    assert polled.returncode == 0, polled.stderr
    assert "2 failed jobs requeued" in polled.stdout
    # Said, not left to be found out: their second poll finds the same error.
    assert ("2 jobs failed upstream (the generation's own error): polled again, they find "
            "the same error; --resubmit POSTs a new generation (charged)") in polled.stdout
    assert "1 job left failed" in polled.stdout and "--resubmit" in polled.stdout
    # At once, it said only "nothing to retry" (review 124).
    early = vidq(first, "retry", "night", "--resubmit", "--yes", "--ids", rejected[0])
    assert "; nothing to retry now: 2 jobs still running or polled again" in early.stdout, \
        early.stdout
    assert first.wait_finished("night")["failed"] == 3
    assert first.sandbox.stats()["submissions"] == 5  # polled, never re-posted
    old_ids = {entry["prompt"]: entry["id"] for entry in first.ledger()}

    refused = vidq(first, "retry", "night", "--resubmit")
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: 3 jobs of batch night will be POSTed again")
    assert "--yes" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert first.store.counts("night")["failed"] == 3

    first.stop_workers()
    second = make_pipeline(make_sandbox(reject_substring=""))
    second.start_workers()
    resubmitted = vidq(second, "retry", "night", "--resubmit", "--yes")
    assert resubmitted.returncode == 0, resubmitted.stderr
    assert "3 failed jobs requeued (3 to be POSTed again, 0 polled again)" in resubmitted.stdout
    assert "new charge" in resubmitted.stderr
    # Their generations were seen to fail: not ones "nobody saw finish".
    assert "nobody saw finish" not in resubmitted.stdout, resubmitted.stdout
    assert second.wait_finished("night")["done"] == 6

    posts = Counter(entry["prompt"] for entry in second.ledger())
    assert posts == Counter({LONELY: 1, **{prompt: 1 for prompt in REJECTED}})
    new_ids = {entry["prompt"]: entry["id"] for entry in second.ledger()}
    rows = {row["prompt"]: row for row in report(second, "night")}
    for prompt in REJECTED:
        assert rows[prompt]["generation_ids"] == [old_ids[prompt], new_ids[prompt]]
    assert rows[LONELY]["generation_ids"] == [new_ids[LONELY]]
    assert all(row["state"] == "done" and row["sha256"] for row in rows.values())


@pytest.mark.slow
def test_resubmit_never_pays_again_for_a_generation_that_finished(make_pipeline, tmp_path):
    """A job whose generation completed upstream but whose video could not be
    stored before the hard limit fails with its id. `vidq retry --resubmit`
    does not POST it again (nothing to confirm: no new charge) and says so; its
    video is downloaded, the sandbox's bytes, with one POST in the ledger."""
    pipeline = make_pipeline(VIDQ_DEADLINE_S=3, VIDQ_HARD_LIMIT_S=5)
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "night").write_text("a file where the batch's directory goes")  # storage refuses
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "a.txt", [LONELY]), "night")
    assert pipeline.wait_finished("night")["failed"] == 1
    [paid] = pipeline.ledger()
    assert paid["status"] == "completed"
    (videos / "night").unlink()

    result = vidq(pipeline, "retry", "night", "--resubmit")  # no --yes, no terminal
    assert result.returncode == 0, result.stderr
    assert "1 job not POSTed again: its generation finished upstream" in result.stdout
    assert "1 failed job requeued" in result.stdout and "POSTed again)" not in result.stdout
    assert pipeline.wait_finished("night")["done"] == 1
    assert [entry["id"] for entry in pipeline.ledger()] == [paid["id"]]  # one POST
    [row] = report(pipeline, "night")
    assert row["generation_ids"] == [paid["id"]]
    video = hashlib.sha256((videos / "night" / f"{row['custom_id']}.mp4").read_bytes()).hexdigest()
    assert video == row["sha256"] == paid["sha256"]


@pytest.mark.slow
def test_resubmit_looks_first_at_a_generation_nobody_saw_finish(make_pipeline, make_sandbox,
                                                               tmp_path):
    """Two jobs fail at the hard limit while their generations still run, ids
    kept. One is resubmitted while its generation still runs: POSTed again.
    The other once its generation has completed upstream: `--resubmit` took
    "no completion seen" for "not finished", retired the paid id and POSTed
    again, and the finished video was never downloaded. It is looked at
    first: downloaded, the sandbox's bytes, and nothing POSTed."""
    # Generations of 20 s against a 4 s hard limit: still running when their
    # jobs fail and the first retry looks, even on a loaded machine (at 8 s
    # one flaked under -n 6; at 14 s, once, under -n 3 beside a full run).
    sandbox = make_sandbox(time_scale=1, mean_generation_s=20, spread=0)
    pipeline = make_pipeline(sandbox, VIDQ_EXPECTED_GENERATION_S=20, VIDQ_DEADLINE_S=2,
                             VIDQ_HARD_LIMIT_S=4, VIDQ_OVERDUE_POLL_INTERVAL_S=0.5)
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "a.txt", ["too soon", "finished later"]), "late")
    assert pipeline.wait_finished("late", timeout_s=30)["failed"] == 2
    # Read here, not with `vidq report`: one command less before the first
    # generation completes (two slow commands could outlast its 10 s).
    store = pipeline.store
    ids = {store.get(keys.job_ref("late", job_id)).request["prompt"]: job_id
           for job_id in store.job_ids("late")}
    first = {entry["prompt"]: entry for entry in pipeline.ledger()}
    assert all(entry["status"] != "completed" for entry in first.values()), first

    soon = vidq(pipeline, "retry", "late", "--resubmit", "--yes", "--ids", ids["too soon"])
    assert soon.returncode == 0, soon.stderr
    wait_until(lambda: len(pipeline.ledger()) == 3, 30, "the new POST of the job still running")
    wait_until(lambda: {e["id"]: e for e in pipeline.ledger()}[first["finished later"]["id"]][
        "status"] == "completed", 30, "the other generation to complete")
    wait_until(lambda: pipeline.store.counts("late")["failed"] == 2, 30, "the new POST's timeout")
    # Its new POST's id is recorded: the retired generation is behind it, not
    # looked at again by a later --resubmit, its age read from the new POST's
    # (review 118).
    assert not store.redis.hexists(keys.job(keys.job_ref("late", ids["too soon"])),
                                   "check_before_post")
    charged = {r["prompt"]: r["credits"] for r in report(pipeline, "late")}["finished later"]
    # A 403 says nothing of the generation (a key being rotated): it was taken
    # for "forgotten" and the prompt POSTed again. Only a 404 or 410 is.
    pipeline.faults(poll=[403, 403])
    later = vidq(pipeline, "retry", "late", "--resubmit", "--yes", "--ids", ids["finished later"])
    assert later.returncode == 0, later.stderr
    assert ("1 job had a generation nobody saw finish: it is looked at again before the new "
            "POST, and if it finished meanwhile its video is downloaded") in later.stdout

    wait_until(lambda: pipeline.store.counts("late")["done"] == 1, 30, "the finished video")
    posts = Counter(entry["prompt"] for entry in pipeline.ledger())
    assert posts == Counter({"too soon": 2, "finished later": 1})
    row = {r["prompt"]: r for r in report(pipeline, "late")}["finished later"]
    assert row["state"] == "done" and row["generation_ids"] == [first["finished later"]["id"]]
    paid = {entry["id"]: entry for entry in pipeline.ledger()}[first["finished later"]["id"]]
    video = (tmp_path / "videos" / "late" / f"{row['custom_id']}.mp4").read_bytes()
    assert hashlib.sha256(video).hexdigest() == row["sha256"] == paid["sha256"]
    assert row["credits"] == charged  # counted when it failed, not again when taken back
    assert "not checked yet (HTTP 403" in (pipeline.log_dir / "worker-0.log").read_text()


def _failed_then_restarted(make_pipeline, sandbox, tmp_path, prompt: str, hard_limits, env,
                           meanwhile=lambda short, ref: None):
    """One job of batch `g` failed at a hard limit too short for the night;
    the workers restarted with it raised, as the README advises. Returns the
    new pipeline and the job's ref (`meanwhile` runs while it was running)."""
    short = make_pipeline(sandbox, VIDQ_HARD_LIMIT_S=hard_limits[0], **env)
    short.start_workers()
    short.enqueue(write_prompts(tmp_path / "g.txt", [prompt]), "g")
    [job_id] = short.store.job_ids("g")
    meanwhile(short, keys.job_ref("g", job_id))
    assert short.wait_finished("g", timeout_s=30)["failed"] == 1
    short.stop_workers()
    pipeline = make_pipeline(sandbox, VIDQ_HARD_LIMIT_S=hard_limits[1], **env)
    pipeline.start_workers()
    return pipeline, keys.job_ref("g", job_id)


def _resubmitted_to_one_stored_video(pipeline, tmp_path) -> dict:
    """`vidq retry g --resubmit`: the earlier generation's video is stored and
    nothing is POSTed again; returns the sandbox's ledger entry."""
    retried = vidq(pipeline, "retry", "g", "--resubmit", "--yes")
    assert retried.returncode == 0, retried.stderr
    assert pipeline.wait_finished("g", timeout_s=60)["done"] == 1
    [entry] = pipeline.ledger()
    [row] = report(pipeline, "g")
    video = (tmp_path / "videos" / "g" / f"{row['custom_id']}.mp4").read_bytes()
    assert hashlib.sha256(video).hexdigest() == row["sha256"] == entry["sha256"]
    assert row["generation_ids"] == [entry["id"]]
    return entry


@pytest.mark.slow
def test_resubmit_under_a_raised_hard_limit_polls_the_generation_still_running(
        make_pipeline, make_sandbox, tmp_path):
    """A job failed at a hard limit too short for the night (4 s against 14 s
    generations); the workers restart with it raised, as the README advises,
    and `vidq retry --resubmit` runs while its generation still runs. The
    look found it pending and POSTed anyway: two generations paid, two
    upstream at C = 1, the first never fetched (review 116). It is polled
    again now: one POST, its video stored."""
    sandbox = make_sandbox(time_scale=1, mean_generation_s=14, spread=0)
    env = dict(VIDQ_EXPECTED_GENERATION_S=14, VIDQ_DEADLINE_S=2, VIDQ_MAX_IN_FLIGHT=1,
               VIDQ_OVERDUE_POLL_INTERVAL_S=0.5)
    pipeline, _ = _failed_then_restarted(make_pipeline, sandbox, tmp_path, "still running",
                                         (4, 120), env)
    _resubmitted_to_one_stored_video(pipeline, tmp_path)
    assert sandbox.stats()["max_in_flight"] == 1


def test_a_404_to_the_look_before_a_resubmit_polls_instead_of_paying_twice(
        make_pipeline, make_sandbox, tmp_path):
    """The job failed at a hard limit too short for its generation, which
    finished after; the workers restart with the limit raised and `vidq
    retry --resubmit` runs. A gateway answered the look before the new POST
    404 once: taken for "forgotten", the prompt was POSTed again, two
    generations paid and the first, finished, never fetched (review 119).
    Short of the hard limit a 404 is polled, as a poll's 404 is."""
    sandbox = make_sandbox(time_scale=1, mean_generation_s=5, spread=0)
    env = dict(VIDQ_EXPECTED_GENERATION_S=5, VIDQ_DEADLINE_S=1, VIDQ_OVERDUE_POLL_INTERVAL_S=0.5)
    pipeline, _ = _failed_then_restarted(make_pipeline, sandbox, tmp_path, "finished unseen",
                                         (2, 60), env)
    wait_until(lambda: pipeline.ledger()[0]["status"] == "completed", 30, "the generation")

    pipeline.faults(poll=[404])
    assert _resubmitted_to_one_stored_video(pipeline, tmp_path)["downloads"] == 1


def test_a_resubmit_adopting_a_forgotten_generation_gives_its_slot_up_again(
        make_pipeline, make_sandbox, tmp_path):
    """The upstream forgot a job's generation: its polls got 404s, its slot was
    given up past the deadline, it failed at the hard limit. Workers restart
    with the limit raised and `retry --resubmit` looks at the generation: a
    404, short of the hard limit, so it is polled (review 119). The job kept
    `slot_given_up` from its first slot: its new slot was never given up,
    held to the new hard limit, another batch waiting (review 121); and it
    showed `queued` while it held that slot."""
    sandbox = make_sandbox(time_scale=1, mean_generation_s=3, spread=0)
    env = dict(VIDQ_EXPECTED_GENERATION_S=3, VIDQ_DEADLINE_S=1, VIDQ_MAX_IN_FLIGHT=1,
               VIDQ_OVERDUE_POLL_INTERVAL_S=0.5)

    def forget(short, ref) -> None:
        wait_until(lambda: short.store.get(ref).generation_id, 30, "the generation id")
        requests.post(sandbox.url + "/__forget", json={"id": short.store.get(ref).generation_id},
                      timeout=10).raise_for_status()

    pipeline, ref = _failed_then_restarted(make_pipeline, sandbox, tmp_path, "a forgotten fox",
                                           (3, 300), env, forget)
    assert pipeline.store.redis.hget(keys.job(ref), "slot_given_up") == "1"
    forgotten = pipeline.ledger()[0]["id"]

    assert vidq(pipeline, "retry", "g", "--resubmit", "--yes").returncode == 0
    wait_until(lambda: pipeline.store.get(ref).generation_id == forgotten, 30, "the adoption")
    assert pipeline.store.counts("g")["queued"] == 0
    pipeline.enqueue(write_prompts(tmp_path / "h.txt", ["a heron waiting"]), "h")
    assert pipeline.wait_finished("h", timeout_s=40)["done"] == 1
    assert Counter(entry["prompt"] for entry in pipeline.ledger()) == Counter(
        {"a forgotten fox": 1, "a heron waiting": 1})


def test_a_resubmitted_job_cancelled_before_its_post_still_gets_its_finished_video(
        make_pipeline, make_sandbox, tmp_path):
    """`vidq retry --resubmit` put back in line a job whose generation nobody
    saw finish (it failed at the hard limit), to be looked at before a new
    POST; then `vidq cancel`. The job ended cancelled and the generation,
    finished and paid for, was never fetched (review 116). Cancel now polls
    it, as it does any paid generation of a cancelled batch."""
    sandbox = make_sandbox(time_scale=1, mean_generation_s=5, spread=0)
    pipeline = make_pipeline(sandbox, VIDQ_EXPECTED_GENERATION_S=5, VIDQ_DEADLINE_S=1,
                             VIDQ_HARD_LIMIT_S=2, VIDQ_OVERDUE_POLL_INTERVAL_S=0.5)
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "g.txt", ["finished unseen"]), "g")
    assert pipeline.wait_finished("g", timeout_s=30)["failed"] == 1
    wait_until(lambda: pipeline.ledger()[0]["status"] == "completed", 30, "the generation")
    for command in (["pause", "g"], ["retry", "g", "--resubmit", "--yes"], ["cancel", "g"]):
        done = vidq(pipeline, *command)
        assert done.returncode == 0, (command, done.stderr)

    assert pipeline.wait_finished("g", timeout_s=30)["done"] == 1
    [entry] = pipeline.ledger()
    [row] = report(pipeline, "g")
    video = (tmp_path / "videos" / "g" / f"{row['custom_id']}.mp4").read_bytes()
    assert hashlib.sha256(video).hexdigest() == row["sha256"] == entry["sha256"]


@pytest.mark.slow
def test_include_completed_buys_a_new_generation_when_the_finished_one_cannot_be_had(
        make_pipeline, make_sandbox, tmp_path):
    """The finished generation's link is refused for good (410 on every
    download): a plain --resubmit only polls it again. --include-completed
    (with --resubmit, confirmed as a charge) POSTs once more; the new video
    lands and the old id stays in the job's history."""
    pipeline = make_pipeline(VIDQ_DEADLINE_S=3, VIDQ_HARD_LIMIT_S=5)
    pipeline.faults(download=[410] * 200)
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "a.txt", [LONELY]), "gone")
    assert pipeline.wait_finished("gone")["failed"] == 1
    [paid] = pipeline.ledger()

    alone = vidq(pipeline, "retry", "gone", "--include-completed")
    assert alone.returncode == 2 and "goes with --resubmit" in alone.stderr
    unconfirmed = vidq(pipeline, "retry", "gone", "--resubmit", "--include-completed")
    assert unconfirmed.returncode == 2 and "1 job of batch gone will be POSTed again" in (
        unconfirmed.stderr)
    [job_id] = pipeline.store.job_ids("gone")
    link = pipeline.store.get(keys.job_ref("gone", job_id)).extra["video_url"]
    while requests.get(link, timeout=10).status_code == 410:  # the CDN is fine again
        pass
    bought = vidq(pipeline, "retry", "gone", "--resubmit", "--include-completed", "--yes")
    assert bought.returncode == 0, bought.stderr
    assert "(1 to be POSTed again, 0 polled again)" in bought.stdout
    assert pipeline.wait_finished("gone")["done"] == 1

    [first, second] = pipeline.ledger()
    assert first["id"] == paid["id"] and first["prompt"] == second["prompt"] == LONELY
    [row] = report(pipeline, "gone")
    assert row["generation_ids"] == [paid["id"], second["id"]] and row["sha256"] == (
        second["sha256"])


def test_retry_reads_only_the_failures_of_a_big_batch(make_pipeline):
    """Given 10,000 jobs of which 3 failed, `vidq retry` costs a few dozen Redis
    commands, not one per job; --ids and --reason choose among the failures; an
    unknown id or batch exits 2; a batch older than the failed set is rebuilt."""
    pipeline = make_pipeline()
    store = pipeline.store
    jobs = [(f"j{i:05d}", {"model": "m", "prompt": f"prompt {i}"}) for i in range(10_000)]
    pipeline.admission.enqueue("big", jobs, time.time())
    for job_id, reason in (("j00007", "poll: upstream error: blocked term"),
                           ("j05000", "timeout: still 'generating' after 86400 s"),
                           ("j09999", "poll: upstream error: blocked term")):
        mark_failed(store, "big", job_id, reason)
    client = store.redis

    unknown = vidq(pipeline, "retry", "big", "--ids", "nope,j00007")
    assert unknown.returncode == 2 and "'big'" in unknown.stderr and "nope" in unknown.stderr
    assert vidq(pipeline, "retry", "no-such-batch").returncode == 2
    before = int(client.info("stats")["total_commands_processed"])
    chosen = vidq(pipeline, "retry", "big", "--reason", "BLOCKED", "--ids", "j00007 j05000")
    used = int(client.info("stats")["total_commands_processed"]) - before

    assert chosen.returncode == 0, chosen.stderr
    assert "batch big: 1 failed job requeued" in chosen.stdout
    assert used < 150, f"{used} Redis commands for one failure among 10,000 jobs"
    assert store.get(keys.job_ref("big", "j00007")).state == State.QUEUED
    client.delete(keys.batch_failed("big"))  # as if enqueued before the set existed
    assert [f.job_id for f in failures(store, "big")] == ["j05000", "j09999"]
    rest = vidq(pipeline, "retry", "big")
    assert "batch big: 2 failed jobs requeued" in rest.stdout, rest.stderr
    assert store.counts("big")["failed"] == 0 and client.scard(keys.batch_failed("big")) == 0
    assert vidq(pipeline, "cancel", "big").returncode == 0
    cancelled = vidq(pipeline, "retry", "big")
    assert cancelled.returncode == 2 and "was cancelled" in cancelled.stderr


def manifest_rows(pipeline, batch: str, name: str = "manifest.jsonl") -> list[dict]:
    path = videos_dir(pipeline) / batch / name
    return [json.loads(line) for line in path.read_text().splitlines()]


def videos_dir(pipeline) -> Path:
    return Path(pipeline.settings.storage_url.removeprefix("file://"))




def worker_log(pipeline) -> str:
    return "".join(path.read_text(errors="replace") for path in pipeline.log_dir.glob("*.log"))


def test_a_finished_batch_writes_its_manifest_once_and_again_after_a_retry(make_pipeline,
                                                                          tmp_path):
    """When the last job ends, `<batch>/manifest.jsonl` (the rows of `vidq report`)
    and `<batch>/errors.jsonl` (the failed rows) land in storage, written by one
    process; sidecars carry the effective parameters; a writer that died (its lock
    left behind, no mark) is replaced by the reconciler; a retry reopens the batch
    and its next finish writes the manifest again."""
    pipeline = make_pipeline()
    pipeline.start_workers(concurrency=4)
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", GOOD + REJECTED[:1]), "m",
                     resolution="480P")
    pipeline.wait_finished("m")
    path = videos_dir(pipeline) / "m" / "manifest.jsonl"
    wait_until(path.exists, what="manifest")

    assert manifest_rows(pipeline, "m") == report(pipeline, "m")
    errors = manifest_rows(pipeline, "m", "errors.jsonl")
    assert [row["prompt"] for row in errors] == REJECTED[:1] and errors[0]["error"]
    assert worker_log(pipeline).count("batch m: manifest written") == 1
    row = manifest_rows(pipeline, "m")[0]
    sidecar = json.loads((videos_dir(pipeline) / "m" / f"{row['custom_id']}.json").read_text())
    assert sidecar["parameters"] == row["parameters"] == {
        "resolution": "480P", "aspect_ratio": "16:9", "watermark": False,
        "enhance_prompt": True}

    client = pipeline.store.redis
    path.unlink()  # a writer died mid-way: its lock is left, nothing marked
    client.hdel(keys.batch("m"), "manifest_of")
    client.set(keys.manifest_lock("m"), "dead-writer", px=1500)
    wait_until(path.exists, what="manifest rewritten by the reconciler")
    assert manifest_rows(pipeline, "m") == report(pipeline, "m")

    written_at = float(client.hget(keys.batch("m"), "manifest_at"))
    failed_at = manifest_rows(pipeline, "m", "errors.jsonl")[0]["failed_at"]
    assert vidq(pipeline, "retry", "m").returncode == 0
    wait_until(lambda: float(client.hget(keys.batch("m"), "manifest_at") or 0) > written_at,
             what="manifest rewritten after the retry")
    assert manifest_rows(pipeline, "m") == report(pipeline, "m")
    assert manifest_rows(pipeline, "m", "errors.jsonl")[0]["failed_at"] > failed_at


@pytest.mark.slow
def test_status_counts_the_batch_apart_from_the_deployment_and_watch_reports_failures(
        make_pipeline, tmp_path):
    """`vidq status` counts waiting jobs for the batch and for the deployment apart,
    warns when no worker is alive; `--watch` into a pipe prints progress lines, ends
    with the failures grouped by reason and exits 1; `--json` carries reasons, rate,
    ETA and the manifest; `vidq batches` lists every batch."""
    pipeline = make_pipeline(VIDQ_MAX_IN_FLIGHT="2")
    pipeline.enqueue(write_prompts(tmp_path / "a.txt", GOOD + [f"REJECT shot {i}" for i in
                                                               range(3)]), "a")
    pipeline.enqueue(write_prompts(tmp_path / "b.txt", ["a quiet harbour"]), "b")

    idle = vidq(pipeline, "status", "a", "--json")
    assert idle.returncode == 0, idle.stderr
    before = json.loads(idle.stdout)
    assert (before["waiting"], before["in_flight"], before["deployment"]["waiting"]) == (6, 0, 7)
    assert before["workers_alive"] == 0 and before["eta_s"] is None
    assert "warning: no worker is alive" in vidq(pipeline, "status", "a").stdout

    pipeline.start_workers()
    watched = vidq(pipeline, "status", "a", "--watch", "--every", "1")
    assert watched.returncode == 1, watched.stderr
    lines = watched.stdout.splitlines()
    assert sum(line.startswith("a: ") and " ended; " in line for line in lines) >= 2
    assert "a: 3 done, 3 failed of 6" in lines
    assert any(line.strip().startswith("3 x poll:") and "blocked term" in line for line in lines)

    after = json.loads(vidq(pipeline, "status", "a", "--json").stdout)
    assert after["failures"]["count"] == 3 and after["failures"]["top_reasons"][0]["count"] == 3
    assert after["errors_spiking"] and after["rate_per_min"] > 0 and after["eta_s"] == 0
    assert after["workers_alive"] >= 1 and after["manifest"].endswith("a/manifest.jsonl")
    assert "warning: 3 failures in the last 2 min" in vidq(pipeline, "status", "a").stdout
    listed = json.loads(vidq(pipeline, "batches", "--json").stdout)
    assert {row["batch"]: row["total"] for row in listed} == {"a": 6, "b": 1}
    code, drawn = watch_on_a_terminal(pipeline, "a")
    assert code == 1
    for label, count in (("done", 3), ("failed", 3), ("in flight", 0), ("waiting", 0)):
        assert re.search(rf"{label} [━╸╺]+ {count}/6", drawn), (label, drawn)


def watch_on_a_terminal(pipeline, batch: str) -> tuple[int, str]:
    """`vidq status BATCH --watch` with its output on a pseudo-terminal."""
    leader, follower = pty.openpty()
    env = {**os.environ, "VIDQ_REDIS_URL": pipeline.settings.redis_url, "COLUMNS": "120",
           "VIDQ_STORAGE_URL": pipeline.env["VIDQ_STORAGE_URL"], "TERM": "xterm"}
    process = subprocess.Popen(["vidq", "status", batch, "--watch"], env=env, stdout=follower,
                               stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the command has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    drawn = b"".join(chunks).decode(errors="replace")
    return process.wait(timeout=60), re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn)


def redis_memory(client) -> int:
    """INFO used_memory, less any stream (the event stream is trimmed to
    VIDQ_EVENTS_MAXLEN by its own pass, not by retention)."""
    streams = sum(client.memory_usage(key) or 0 for key in client.scan_iter("vidq:*")
                  if client.type(key) == "stream")
    return int(client.info("memory")["used_memory"]) - streams


def simulate_night(pipeline, batch: str, jobs: int) -> None:
    """A night's batch, every job done (its record as a download leaves it)."""
    store = pipeline.store
    pipeline.admission.enqueue(batch, [(f"j{i:04d}", {"model": "m", "prompt": f"{batch} {i}"},
                                        {"line": i + 1}) for i in range(jobs)], time.time())
    for job_id in store.job_ids(batch):
        job = store.get(keys.job_ref(batch, job_id))
        store.transition(job, state=State.DONE, expected_token="*", generation_id=f"g-{job_id}",
                         storage_key=f"{batch}/{job_id}.mp4", sha256="ab" * 32, bytes=1000,
                         downloaded_at=time.time(), polls=2)


@pytest.mark.slow
def test_status_of_a_batch_gone_from_redis_tells_its_failures_and_watch_exits_1(
        make_pipeline, tmp_path):
    """The morning check after a `vidq run` (its Redis stopped) or a purge:
    status read from the manifest said only the counts, and `--watch` exited
    0 with a failed job."""
    pipeline = make_pipeline(VIDQ_RETENTION_S="0")
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [GOOD[0], "REJECT this one"]), "gone")
    pipeline.wait_finished("gone")
    client = pipeline.store.redis
    wait_until(lambda: not client.sismember(keys.BATCHES, "gone"), what="batch expired")
    watched = vidq(pipeline, "status", "gone", "--watch")
    assert watched.returncode == 1, watched.stdout + watched.stderr
    assert "from its manifest: 1 done, 1 failed" in watched.stdout
    assert "1 failed, by reason:" in watched.stdout and "content policy" in watched.stdout
    said = json.loads(vidq(pipeline, "status", "gone", "--json").stdout)
    assert said["failures"]["count"] == 1 and said["outcome_unknown"] == 0
    assert said["credits"]["spent"] > 0
    assert vidq(pipeline, "status", "gone").returncode == 0
    pipeline.stop_workers()


@pytest.mark.slow
def test_finished_batches_leave_redis_and_memory_stays_bounded_night_after_night(
        make_pipeline, tmp_path):
    """Given retention 0: on real workers a finished batch leaves Redis and `vidq
    report` reads its manifest from storage. Five simulated 1,000-job nights, each
    cleared by the housekeeping pass, leave Redis's key count and memory where one
    night left them; kept, the same nights grow it. `vidq purge` refuses an
    unfinished batch (saying what it would drop) unless --force."""
    from worker.retention import housekeeping
    from worker.storage import open_storage

    pipeline = make_pipeline(VIDQ_RETENTION_S="0")
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", GOOD), "real")
    pipeline.wait_finished("real")
    client = pipeline.store.redis
    wait_until(lambda: not client.sismember(keys.BATCHES, "real"), what="batch expired")
    assert not client.keys("vidq:*real*")
    rows = report(pipeline, "real")
    assert sorted(row["prompt"] for row in rows) == sorted(GOOD)
    assert all(row["state"] == "done" and row["sha256"] for row in rows)
    assert report(pipeline, "real", "--state", "failed") == []
    expired = json.loads(vidq(pipeline, "status", "real", "--json").stdout)
    assert expired["expired"] and expired["counts"] == {"done": 3}
    said = vidq(pipeline, "status", "real").stdout
    # Also what a `vidq run` batch shows once the run (and its own Redis) ended.
    assert "or run by `vidq run` on a Redis of its own); from its manifest: 3 done" in said
    pipeline.stop_workers()

    storage = open_storage(pipeline.settings.storage_url, pipeline.settings.s3_part_bytes)
    settings = pipeline.settings
    sizes = []
    for night in range(5):
        simulate_night(pipeline, f"night-{night}", 1000)
        kept = client.dbsize(), redis_memory(client)
        housekeeping(client, storage, settings)  # writes the manifest
        housekeeping(client, storage, settings)  # retention 0: the batch leaves
        sizes.append((client.dbsize(), redis_memory(client)))
        assert kept[0] > sizes[-1][0] + 1000
    one_night = kept[1] - sizes[-1][1]
    assert sizes[-1][0] <= sizes[0][0], sizes
    assert sizes[-1][1] - sizes[0][1] < one_night / 4, (sizes, one_night)
    assert len(report(pipeline, "night-0")) == 1000

    simulate_night(pipeline, "unfinished", 3)
    mark_failed(pipeline.store, "unfinished", "j0000", "gave up")
    client.hset(keys.job(keys.job_ref("unfinished", "j0001")), "state", "queued")
    client.hincrby(keys.batch_counts("unfinished"), "done", -1)
    refused = vidq(pipeline, "purge", "unfinished")
    assert refused.returncode == 2 and "2 of 3 jobs ended" in refused.stderr
    assert "1 unfinished job" in refused.stderr and "--force" in refused.stderr
    assert client.sismember(keys.BATCHES, "unfinished")
    forced = vidq(pipeline, "purge", "unfinished", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "3 job records" in forced.stdout and "no manifest" in forced.stdout
    assert not client.keys("vidq:*unfinished*")
    assert vidq(pipeline, "report", "unfinished").returncode == 2


def test_the_same_prompts_with_other_flags_are_refused_unless_variants_are_allowed(
        make_pipeline, tmp_path):
    """Re-enqueueing a file with `--resolution 480P` into its batch says how many
    new jobs differ only by parameters and exits 2 with nothing enqueued; with
    --allow-variants they are added; the unchanged file still adds nothing."""
    pipeline = make_pipeline()
    path = write_prompts(tmp_path / "p.txt", GOOD)
    assert vidq(pipeline, "enqueue", str(path), "--batch", "v").returncode == 0
    client = pipeline.store.redis
    keys_before = client.dbsize()

    refused = vidq(pipeline, "enqueue", str(path), "--batch", "v", "--resolution", "480P")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: {path}: 3 new jobs differ from jobs already in batch 'v' only by parameters "
        "(resolution): each would be a new generation and a new charge; add "
        "--allow-variants to enqueue them anyway (nothing was enqueued)"]
    assert pipeline.store.batch_total("v") == 3 and client.dbsize() == keys_before

    again = vidq(pipeline, "enqueue", str(path), "--batch", "v")
    assert again.returncode == 0 and "(0 new, 3 already enqueued)" in again.stdout
    # 720P is the upstream's default: the same requests, neither variants nor
    # new jobs to buy again (they were, under the ids of the spelled requests).
    spelled = vidq(pipeline, "enqueue", str(path), "--batch", "v", "--resolution", "720P")
    assert spelled.returncode == 0, spelled.stderr
    assert "(0 new, 3 already enqueued)" in spelled.stdout
    assert pipeline.store.batch_total("v") == 3
    allowed = vidq(pipeline, "enqueue", str(path), "--batch", "v", "--resolution", "480P",
                   "--allow-variants")
    assert allowed.returncode == 0, allowed.stderr
    assert "3 new, 0 already enqueued, 3 of the new ones variants" in allowed.stdout
    assert pipeline.store.batch_total("v") == 6
    other = vidq(pipeline, "enqueue", str(path), "--batch", "w", "--resolution", "480P")
    assert other.returncode == 0 and "3 new" in other.stdout


def test_a_shell_with_another_storage_url_leaves_the_manifest_to_the_workers(make_pipeline,
                                                                              tmp_path):
    """The workers store under videos/; a producer's shell says elsewhere/.
    `vidq status` used to write the manifest (and mark it written) in its own
    storage, so the workers' never got one, and `vidq report` pointed at files
    that were not there. Now status leaves it to the workers and says so, the
    report points where the videos are, and purge refuses."""
    pipeline = make_pipeline()
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", GOOD), "split")
    pipeline.wait_finished("split")
    elsewhere = tmp_path / "elsewhere"
    env = {**os.environ, "VIDQ_REDIS_URL": pipeline.settings.redis_url,
           "VIDQ_STORAGE_URL": elsewhere.as_uri()}

    def shell(*args):
        return subprocess.run(["vidq", *args], env=env, capture_output=True, text=True,
                              timeout=120)

    status = shell("status", "split")
    assert status.returncode == 0, status.stderr
    assert "not the workers'" in status.stderr
    wait_until(lambda: (tmp_path / "videos" / "split" / "manifest.jsonl").exists(),
               what="the workers' manifest")
    assert not elsewhere.exists()
    rows = [json.loads(line) for line in shell("report", "split").stdout.splitlines()]
    assert len(rows) == len(GOOD)
    for row in rows:
        assert Path(urlparse(row["storage_url"]).path).is_file(), row["storage_url"]
    purge = shell("purge", "split")
    assert purge.returncode == 2 and "nothing was purged" in purge.stderr
    assert pipeline.store.batch_total("split") == len(GOOD)


def test_a_retry_that_dies_after_putting_jobs_back_still_gets_a_new_manifest(make_pipeline,
                                                                             tmp_path):
    """`vidq retry` died (Ctrl-C, OOM) right after putting the failures back in
    line: the batch's reopened count was a write of its own after that, so
    the batch finished again under its old stamp and its manifest said
    "failed" for videos stored since, for good (review 117). The count now
    changes in the same script: the workers write a new manifest."""
    pipeline = make_pipeline()
    pipeline.faults(submit=[400, 400])
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["refused once", "refused too"]), "rd")
    assert pipeline.wait_finished("rd", timeout_s=30)["failed"] == 2
    manifest = tmp_path / "videos" / "rd" / "manifest.jsonl"
    wait_until(manifest.exists, 30, "the first manifest")

    # What the command had done when it died: no admit, nothing after.
    assert pipeline.admission.requeue_failed("rd") == {"requeued": 2}
    assert pipeline.wait_finished("rd", timeout_s=30)["done"] == 2
    wait_until(lambda: all(json.loads(line)["state"] == "done"
                           for line in manifest.read_text().splitlines()), 30,
               "the manifest of the stored videos")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:
        video = (tmp_path / "videos" / "rd" / f"{row['custom_id']}.mp4").read_bytes()
        assert hashlib.sha256(video).hexdigest() == row["sha256"]


def test_a_reused_batch_names_earlier_manifest_never_describes_tonights_files(make_pipeline,
                                                                              tmp_path):
    """Last night's batch `nr` stored clip1 and clip2 and its manifest; purged,
    its name comes back tonight with other prompts under the same ids. The
    videos went to replaced/, but the manifest stayed: its rows named
    nr/clip1.mp4 with last night's prompt and generation while that file was
    tonight's, all night, and for good after a `purge --force` (review 117).
    It goes to replaced/ with them now, and so does one whose batch's ids
    tonight's do not meet (review 119)."""
    pipeline = make_pipeline(VIDQ_MAX_IN_FLIGHT=1)
    pipeline.start_workers()
    night = tmp_path / "videos" / "nr"

    def enqueue(name, prompts):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"id": f"clip{i}", "prompt": prompt}) + "\n"
                                for i, prompt in enumerate(prompts, 1)))
        pipeline.enqueue(path, "nr")

    enqueue("n1.jsonl", ["a red fox in the snow", "a blue whale at dawn"])
    assert pipeline.wait_finished("nr", timeout_s=30)["done"] == 2
    wait_until((night / "manifest.jsonl").exists, 30, "last night's manifest")
    assert vidq(pipeline, "purge", "nr").returncode == 0
    enqueue("n2.jsonl", ["a green frog on a leaf", "a lighthouse in fog"])
    contradictions = []
    while not pipeline.store.redis.hget(keys.batch("nr"), "manifest_of"):
        rows = [json.loads(line) for line in (night / "manifest.jsonl").read_text().splitlines()
                ] if (night / "manifest.jsonl").exists() else []
        for row in rows:
            with contextlib.suppress(FileNotFoundError, ValueError):
                card = json.loads((night / f"{row['custom_id']}.json").read_text())
                if (row["prompt"], row["generation_id"]) != (card["prompt"],
                                                             card["generation_id"]):
                    contradictions.append((row["custom_id"], row["prompt"], card["prompt"]))
        time.sleep(0.05)

    assert not contradictions, contradictions[:3]
    assert [json.loads(line)["prompt"] for line in (night / "manifest.jsonl").read_text()
            .splitlines()] == ["a green frog on a leaf", "a lighthouse in fog"]
    [earlier] = (night / "replaced").glob("manifest.*.jsonl")
    assert {json.loads(line)["prompt"] for line in earlier.read_text().splitlines()} == {
        "a red fox in the snow", "a blue whale at dawn"}

    # A third night under ids of its own moves nothing aside on the way: its
    # manifest overwrote the second's, whose two videos stay unlisted (review
    # 119). The second's is kept beside the first's.
    second = (night / "manifest.jsonl").read_text()
    assert vidq(pipeline, "purge", "nr").returncode == 0
    path = tmp_path / "n3.jsonl"
    path.write_text(json.dumps({"id": "clip9", "prompt": "a kite over dunes"}) + "\n")
    pipeline.enqueue(path, "nr")
    assert pipeline.wait_finished("nr", timeout_s=30)["done"] == 1
    wait_until(lambda: pipeline.store.redis.hget(keys.batch("nr"), "manifest_of"), 30,
               "the third night's manifest")
    assert [json.loads(line)["custom_id"] for line in (night / "manifest.jsonl").read_text()
            .splitlines()] == ["clip9"]
    assert second in [kept.read_text() for kept in (night / "replaced").glob("manifest.*.jsonl")]


def test_a_reused_batch_names_earlier_failed_rows_are_moved_aside_not_overwritten(
        make_pipeline, tmp_path):
    """Last night's `nr` failed both its jobs (the upstream refused them); purged,
    its name and ids come back tonight with other prompts, which are stored.
    Its manifest lists no video of tonight's: it goes to replaced/ (review 129:
    its rows had no sha256 to compare, and it was overwritten as the batch's own)."""
    pipeline = make_pipeline(VIDQ_MAX_IN_FLIGHT=2)
    pipeline.start_workers()
    night = tmp_path / "videos" / "nr"
    for name, prompts, ending in (
            ("n1.jsonl", ["REJECT a red fox", "REJECT a blue whale"], "failed"),
            ("n2.jsonl", ["a green frog on a leaf", "a lighthouse in fog"], "done")):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"id": f"clip{i}", "prompt": prompt}) + "\n"
                                for i, prompt in enumerate(prompts, 1)))
        pipeline.enqueue(path, "nr")
        assert pipeline.wait_finished("nr", timeout_s=30)[ending] == 2
        wait_until(lambda: pipeline.store.redis.hget(keys.batch("nr"), "manifest_of"), 30,
                   f"the manifest of {name}")
        if name == "n1.jsonl":
            assert vidq(pipeline, "purge", "nr").returncode == 0

    [earlier] = (night / "replaced").glob("manifest.*.jsonl")
    assert [json.loads(line)["prompt"] for line in earlier.read_text().splitlines()] == [
        "REJECT a red fox", "REJECT a blue whale"]
    assert [json.loads(line)["state"] for line in (night / "manifest.jsonl").read_text()
            .splitlines()] == ["done", "done"]


@pytest.mark.slow
def test_status_after_a_retry_counts_each_job_once_and_names_no_stale_manifest(
        make_pipeline, make_sandbox, tmp_path):
    """Four POSTs refused (400), then `vidq retry`: while the batch runs again
    its old manifest (four failures) is not shown as its manifest; once done,
    the rate counts four endings, not eight, and no failure spike is warned of
    with no job failed."""
    pipeline = make_pipeline(make_sandbox(time_scale=15))  # ~6 s generations
    pipeline.faults(submit=[400, 400, 400, 400])
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"retry rate {i}" for i in range(4)]),
                     "rr")
    assert pipeline.wait_finished("rr")["failed"] == 4
    wait_until(lambda: pipeline.store.redis.hget(keys.batch("rr"), "manifest_of"),
               what="the first manifest")
    # Polls held while the two commands run, so the ~6 s generations cannot
    # all be found done before a slow `vidq status` reads the batch.
    pipeline.store.pause_polls(120)
    assert vidq(pipeline, "retry", "rr", "--yes").returncode == 0
    running = json.loads(vidq(pipeline, "status", "rr", "--json").stdout)
    pipeline.store.redis.delete(keys.PAUSE_POLL)
    assert running["finished"] < 4 and running["manifest"] is None

    assert pipeline.wait_finished("rr", timeout_s=60)["done"] == 4
    status = json.loads(vidq(pipeline, "status", "rr", "--json").stdout)
    assert round(status["rate_per_min"] * status["rate_window_s"] / 60) == 4
    assert status["recent_failures"] == 0 and not status["errors_spiking"]
    assert "warning: " not in vidq(pipeline, "status", "rr").stdout


def test_status_shows_jobs_being_sent_and_no_eta_while_paused_or_unworked(make_pipeline,
                                                                           tmp_path):
    """No worker: the 4 admitted jobs (C = 4) are 'being sent', not missing
    from the sums, and the ETA is unknown because no worker is alive; paused,
    it is unknown because the waiting jobs are not admitted."""
    pipeline = make_pipeline()
    pipeline.admission.set_cap(4)
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"unworked {i}" for i in range(6)]), "u")
    status = json.loads(vidq(pipeline, "status", "u", "--json").stdout)
    assert (status["in_flight"], status["being_sent"], status["waiting"]) == (0, 4, 2)
    assert status["eta_s"] is None and status["eta_basis"] == "no worker is alive"
    assert "0 in flight, 4 being sent, 2 waiting" in vidq(pipeline, "status", "u").stdout

    assert vidq(pipeline, "pause", "u").returncode == 0
    paused = json.loads(vidq(pipeline, "status", "u", "--json").stdout)
    assert paused["eta_s"] is None and paused["eta_basis"].startswith("paused")


def test_workers_storing_in_two_roots_are_named_and_the_report_finds_every_video(
        make_pipeline, make_sandbox, tmp_path):
    """Two workers with different VIDQ_STORAGE_URL split a batch's videos. The
    report and manifest rows used to put every video under the manifest
    writer's root (files that were not there); each row now says where its
    worker stored it, and `vidq status` names the disagreement."""
    sandbox = make_sandbox()
    a = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT=4)
    b = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT=4,
                      VIDQ_STORAGE_URL=(tmp_path / "other-root").as_uri())
    b.log_dir = tmp_path / "logs-b"
    b.log_dir.mkdir()
    a.start_workers(concurrency=2)
    b.start_workers(concurrency=2)
    a.enqueue(write_prompts(tmp_path / "p.txt", [f"two roots {i}" for i in range(8)]), "roots")
    a.wait_finished("roots")

    for root in ("videos", "other-root"):  # each worker stored some
        assert any((tmp_path / root / "roots").glob("*.mp4")), root
    rows = report(a, "roots")
    assert len(rows) == 8
    for row in rows:
        assert Path(urlparse(row["storage_url"]).path).is_file(), row["storage_url"]
    assert "disagree on VIDQ_STORAGE_URL" in vidq(a, "status", "roots").stdout


def test_a_worker_stopped_cleanly_is_no_disagreement_with_its_successor(make_pipeline,
                                                                        make_sandbox, tmp_path):
    """Back-to-back `vidq run --sandbox` runs: the first run's workers stop (warm
    shutdown), the next run's point at a new sandbox port. `vidq status` said
    the live workers disagreed on AIMLAPI_BASE_URL for a minute, a false alarm
    that hides a real one; a worker still running with another value is
    still named."""
    first = make_pipeline(make_sandbox())
    first.start_workers(concurrency=1)
    first.enqueue(write_prompts(tmp_path / "p.txt", ["before"]), "b1")
    first.wait_finished("b1")
    first.stop_workers()
    second = make_pipeline(make_sandbox())
    second.start_workers(concurrency=1)
    second.enqueue(write_prompts(tmp_path / "q.txt", ["after"]), "b2")
    second.wait_finished("b2")

    assert "disagree" not in vidq(second, "status", "b2").stdout
    first.start_workers(concurrency=1)  # running again, with its own sandbox's URL
    wait_for_beats = time.monotonic() + 30
    while "disagree on AIMLAPI_BASE_URL" not in (out := vidq(second, "status", "b2").stdout):
        assert time.monotonic() < wait_for_beats, out
        time.sleep(0.5)


def test_purge_force_keeps_the_slots_of_generations_still_running_so_c_holds(
        make_pipeline, make_sandbox, tmp_path):
    """`vidq purge --force` of a batch whose 2 generations still run upstream
    (C = 2 = the upstream's real limit), another batch waiting: the purged
    generations keep their slots as holds (their refs gone), the waiting batch
    is admitted only once those end, the upstream never runs more than C and
    never answers 429, C is not lowered, and the waiting batch completes."""
    sandbox = make_sandbox(time_scale=15, max_concurrency=2)  # ~6 s generations
    # Nothing learned yet: a hold lasts VIDQ_DEADLINE_S, above any generation here.
    pipeline = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT="2", VIDQ_DEADLINE_S="12",
                             VIDQ_EXPECTED_GENERATION_S="6")
    pipeline.start_workers(1, concurrency=4)
    store, client = pipeline.store, pipeline.store.redis
    # Polls held until the purge has been looked at: a generation found done
    # first would not be "still running" when a slow `vidq purge` starts.
    store.pause_polls(120)
    pipeline.enqueue(write_prompts(tmp_path / "a.txt", ["a purged fox", "a purged whale"]), "a")
    wait_until(lambda: all((job := store.get(keys.job_ref("a", i))) and job.generation_id
                           for i in store.job_ids("a")), 30, "a's two generations running")
    pipeline.enqueue(write_prompts(tmp_path / "b.txt", ["a waiting frog", "a waiting owl"]), "b")

    purged = subprocess.run(["vidq", "purge", "a", "--force"], env=pipeline.env,
                            capture_output=True, text=True, timeout=60)
    slots = [str(ref) for ref in client.zrange(keys.SLOTS, 0, -1)]
    time.sleep(1.5)
    waiting = store.counts("b")["queued"]
    client.delete(keys.PAUSE_POLL)
    counts = pipeline.wait_finished("b", timeout_s=60)
    stats = requests.get(sandbox.url + "/__stats", timeout=5).json()

    assert purged.returncode == 0, purged.stderr
    assert stats["max_in_flight"] <= 2 and stats["rate_limited"] == 0, stats
    assert client.hget(keys.CONFIG, "effective_cap") in (None, "2")
    assert waiting == 2  # not admitted while the purged generations may run
    assert len(slots) == 2 and all(ref.startswith("a:") and "#" in ref for ref in slots), slots
    assert "2 generations of it may still be running upstream" in purged.stdout, purged.stdout
    assert counts["done"] == 2
    assert client.zcard(keys.SLOTS) == 0 and client.zcard(keys.SLOT_HOLDS) == 0


@pytest.mark.slow
def test_purge_force_after_the_upstream_got_slower_keeps_c(make_pipeline, make_sandbox, tmp_path):
    """The plan learned ~2 s generations; the upstream then takes ~10 s. A
    batch whose 2 generations run is purged --force and another enqueued: the
    purged slots were held for the old fit's 99.9th percentile, then given
    to the new batch while the purged generations ran on, 4 upstream at C = 2
    (review 116). Their ids are known: they are asked about, and their slots
    kept until the upstream says they ended."""
    learn = make_pipeline(make_sandbox(time_scale=45), VIDQ_MAX_IN_FLIGHT="2")
    learn.start_workers(1, concurrency=4)
    learn.enqueue(write_prompts(tmp_path / "w.txt", [f"warm {i}" for i in range(12)]), "w")
    assert learn.wait_finished("w", timeout_s=90)["done"] == 12
    learn.stop_workers()
    slower = make_sandbox(time_scale=9, max_concurrency=0)  # ~10 s, counted, never refused
    pipeline = make_pipeline(slower, VIDQ_MAX_IN_FLIGHT="2")
    pipeline.start_workers(1, concurrency=4)
    store = pipeline.store
    pipeline.enqueue(write_prompts(tmp_path / "x.txt", ["a purged kite", "a purged gull"]), "x")
    wait_until(lambda: all((job := store.get(keys.job_ref("x", i))) and job.generation_id
                           for i in store.job_ids("x")), 30, "x's two generations running")
    purged = vidq(pipeline, "purge", "x", "--force")
    assert purged.returncode == 0, purged.stderr
    pipeline.enqueue(write_prompts(tmp_path / "y.txt", ["a new heron", "a new crane"]), "y")

    assert pipeline.wait_finished("y", timeout_s=90)["done"] == 2
    stats = slower.stats()
    assert stats["submissions"] == 4 and stats["max_in_flight"] == 2, stats
    wait_until(lambda: store.redis.zcard(keys.SLOTS) == 0, 30, "every slot free")
    assert not store.redis.exists(keys.PURGED_GENERATIONS)


def test_purge_holds_only_the_slots_whose_generation_may_run_and_a_late_id_keeps_its_hold(
        make_pipeline, tmp_path):
    """Four slot holders purged with --force: a generation not seen complete
    and a POST with no answer yet keep their slots (as holds named apart from
    their refs); a completed generation and a job never POSTed free theirs.
    The POST's late id lands in vidq:orphans and its slot stays held; the same
    batch name enqueued again gets only the free slots, and none of the holds.
    What the four committed against today's credit cap goes with them: spent
    for the two that may be charged, given back for the others (left
    committed, it held the daily cap until midnight)."""
    pipeline = make_pipeline(VIDQ_DEADLINE_S="600")
    admission, store, client = pipeline.admission, pipeline.store, pipeline.store.redis
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"held {i}" for i in range(4)]), "p")
    admission.set_cap(4)
    assert len(admission.pump()) == 4
    running, completed, posting, unsent = (keys.job_ref("p", i) for i in store.job_ids("p"))
    client.hset(keys.job(running), mapping={"generation_id": "gen-running"})
    client.hset(keys.job(completed), mapping={"generation_id": "gen-done", "completed_at": "1"})
    client.hset(keys.job(posting), mapping={"posting_at": "1.5", "posting_op": "op-1"})
    seconds, _ = client.time()
    today = keys.spend_day(seconds // 86400)
    each = float(client.hget(keys.job(unsent), "credits_pending"))
    assert float(client.hget(today, "committed")) == 4 * each > 0

    said: list[str] = []
    run_purge(admission, pipeline.settings, "p", force=True, echo=said.append)
    holds = dict(client.zrange(keys.SLOT_HOLDS, 0, -1, withscores=True))
    assert float(client.hget(today, "committed")) == 0
    assert float(client.hget(today, "spent") or 0) == 2 * each

    assert sorted(client.zrange(keys.SLOTS, 0, -1)) == sorted(holds) == sorted([
        f"{posting}#op-1", f"{running}#gen-running"])
    assert all(seconds + 590 < until < seconds + 610 for until in holds.values()), holds
    assert "2 generations of it may still be running upstream" in " ".join(said), said
    late = Job(batch="p", id=posting.split(":")[1], request={}, state=State.QUEUED,
               extra={"posting_op": "op-1"})
    assert store.record_generation(late, "gen-late", 10.0) == "gen-late"
    assert client.hget(keys.ORPHANS, "gen-late")
    assert client.zscore(keys.SLOT_HOLDS, f"{posting}#op-1")  # still generating
    assert float(client.hget(today, "spent")) == 2 * each  # created: spent it stays
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", [f"held {i}" for i in range(4)]), "p")
    admission.pump()
    slots = [str(ref) for ref in client.zrange(keys.SLOTS, 0, -1)]
    assert len(slots) == 4 and sum("#" not in ref for ref in slots) == 2, slots
    assert admission.waiting("p") == 2 and len(holds) == client.zcard(keys.SLOT_HOLDS)
