"""`vidq purge NAME` and `vidq retry NAME` run at once (review 136). The
purge checked that the batch was finished, then removed its jobs chunk by
chunk; a retry landing in between put paid jobs back in line, and the purge
removed them: both commands said they had succeeded, and 20 of 20 completed,
paid videos were never fetched. The purge now marks the batch in the same
step as its last check, and a retry or an enqueue into a batch so marked is
refused. Real Redis, a real worker, both commands as subprocesses."""
from __future__ import annotations

import subprocess
import time

import pytest
from conftest import wait_until, write_prompts
from test_batch_ops import vidq

from worker import keys, manifest
from worker.errors import InputError
from worker.retention import begin_purge


def _failed_batch(make_pipeline, make_sandbox, tmp_path, prompts: list[str], **env):
    """A finished batch "pr" whose jobs all failed, its manifest written."""
    pipeline = make_pipeline(make_sandbox(max_concurrency=50), **env)
    pipeline.start_workers(1, concurrency=8)
    pipeline.enqueue(write_prompts(tmp_path / "pr.txt", prompts), "pr")
    wait_until(lambda: pipeline.store.counts("pr")["failed"] == len(prompts), 120,
               "every job failed")
    return pipeline


def test_a_batch_being_purged_takes_no_retry_and_no_enqueue(make_pipeline, make_sandbox,
                                                            tmp_path):
    """The purge's first step done (as `vidq purge` does it, after its
    checks): a retry and an enqueue are refused with the reason, and change
    nothing; the purge run again finishes the batch. A retry that came
    first makes the purge refuse instead."""
    pipeline = _failed_batch(make_pipeline, make_sandbox, tmp_path,
                             [f"REJECT {i}" for i in range(3)])
    client = pipeline.store.redis
    wait_until(lambda: manifest.read_marks(client, ["pr"])["pr"].manifest_current, 60,
               "the manifest")
    stamp = manifest.read_marks(client, ["pr"])["pr"].stamp
    assert begin_purge(client, "pr", stamp)

    retry = vidq(pipeline, "retry", "pr")
    assert retry.returncode == 2 and "is being purged" in retry.stderr, retry
    assert "`vidq purge pr` finishes it" in retry.stderr
    enqueue = vidq(pipeline, "enqueue", str(write_prompts(tmp_path / "more.txt", ["more"])),
                    "--batch", "pr")
    assert enqueue.returncode == 2 and "is being purged" in enqueue.stderr, enqueue
    assert pipeline.store.counts("pr")["failed"] == 3 and pipeline.store.batch_total("pr") == 3
    assert "purging" in vidq(pipeline, "status", "pr").stdout

    purge = vidq(pipeline, "purge", "pr")
    assert purge.returncode == 0, purge
    assert not client.exists(keys.batch("pr"), keys.batch_counts("pr"), keys.batch_jobs("pr"))


def test_a_purge_marks_nothing_once_a_retry_reopened_the_batch(make_pipeline, make_sandbox,
                                                               tmp_path):
    pipeline = _failed_batch(make_pipeline, make_sandbox, tmp_path, ["REJECT once"])
    client = pipeline.store.redis
    stamp = manifest.read_marks(client, ["pr"])["pr"].stamp
    assert vidq(pipeline, "retry", "pr").returncode == 0
    assert not begin_purge(client, "pr", stamp)
    assert client.hget(keys.batch("pr"), "purging") is None


@pytest.mark.slow
def test_a_purge_and_a_retry_at_once_lose_no_paid_video(make_pipeline, make_sandbox, tmp_path):
    """Helper 136's night: 20 videos paid and completed, each failed at the
    hard limit while storage refused them, 30,000 cancelled jobs beside
    them; storage comes back, then the operator runs `vidq purge pr` and
    `vidq retry pr` at the same moment. Either the retry comes first and
    the purge refuses (the videos are fetched), or the purge marks the batch
    first and the retry says so; never both "done" with the videos lost."""
    blocker = tmp_path / "videos" / "pr"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a directory")  # storage refuses this batch's files
    pipeline = _failed_batch(make_pipeline, make_sandbox, tmp_path,
                             [f"paid video {i}" for i in range(20)],
                             VIDQ_DEADLINE_S=5, VIDQ_HARD_LIMIT_S=6, VIDQ_MAX_ATTEMPTS=3)
    client = pipeline.store.redis
    assert vidq(pipeline, "pause", "pr").returncode == 0
    filler = tmp_path / "filler.txt"
    filler.write_text("".join(f"filler {i}\n" for i in range(30_000)), encoding="utf-8")
    assert vidq(pipeline, "enqueue", str(filler), "--batch", "pr").returncode == 0
    assert vidq(pipeline, "cancel", "pr").returncode == 0
    blocker.unlink()
    wait_until(lambda: manifest.read_marks(client, ["pr"])["pr"].manifest_current, 120,
               "the manifest")
    ledger = pipeline.ledger()
    assert len(ledger) == 20 and all(g["status"] == "completed" for g in ledger)

    purge = subprocess.Popen(["vidq", "purge", "pr"], env=pipeline.env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    retry = vidq(pipeline, "retry", "pr")
    purge_out, purge_err = purge.communicate(timeout=120)
    said = f"purge {purge.returncode}: {purge_out}{purge_err}\nretry: {retry}"
    assert (purge.returncode == 0) != ("20 failed jobs requeued" in retry.stdout), said
    # On a loaded machine either may also start after the other ended.
    if purge.returncode == 0:
        assert retry.returncode == 2, said
        assert "is being purged" in retry.stderr or "no batch named" in retry.stderr, said
    else:
        assert "was reopened" in purge_err or "is not finished" in purge_err, said
        wait_until(lambda: len(list((tmp_path / "videos" / "pr").glob("*.mp4"))) == 20, 60,
                   "the 20 paid videos stored")
    assert len(pipeline.ledger()) == 20  # nothing POSTed again


def test_a_forced_purge_stopped_after_its_mark_posts_nothing_more(make_pipeline, make_sandbox,
                                                                  tmp_path):
    """`vidq purge --force` stopped right after marking the batch (Ctrl-C, a
    lost connection): the pump still admitted its waiting jobs and the
    workers POSTed them, 12 paid generations in 20 s for a batch being
    dropped, while `vidq status` said none was admitted (review 137). Now a
    batch so marked is served no slot and sends no POST; the forced purge
    run again finishes it."""
    sandbox = make_sandbox(max_concurrency=50, time_scale=30)  # ~3 s generations
    pipeline = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT=2)
    pipeline.start_workers(1, concurrency=4)
    pipeline.enqueue(write_prompts(tmp_path / "pr.txt", [f"waiting {i}" for i in range(30)]),
                     "pr")
    client = pipeline.store.redis
    wait_until(lambda: len(pipeline.ledger()) >= 2, 60, "two POSTed")
    assert begin_purge(client, "pr", "")  # the forced purge's first step
    # The jobs admitted before the mark end; no slot is given again.
    wait_until(lambda: client.zcard(keys.SLOTS) == 0, 30, "the slots free", 0.05)
    posted = len(pipeline.ledger())
    time.sleep(3)  # pump passes: the reconciler's, each second
    assert len(pipeline.ledger()) == posted <= 4
    assert client.zcard(keys.SLOTS) == 0 and pipeline.store.counts("pr")["queued"] >= 26
    assert "purging" in vidq(pipeline, "status", "pr").stdout

    purge = vidq(pipeline, "purge", "pr", "--force")
    assert purge.returncode == 0, purge
    assert not client.exists(keys.batch("pr"), keys.batch_jobs("pr"))


def test_a_cancel_landing_after_a_purge_leaves_no_stray_record(make_pipeline, make_sandbox,
                                                               tmp_path):
    """`vidq cancel` checks the batch exists, then marks it: a purge ending
    in between left a hash of `cancelled` alone, and every later enqueue of
    the name was refused "was cancelled" while `vidq purge` found no batch
    (review 137, 1 in 5 in a tight loop). The mark now needs the batch."""
    pipeline = _failed_batch(make_pipeline, make_sandbox, tmp_path, ["REJECT gone"])
    client = pipeline.store.redis
    assert vidq(pipeline, "purge", "pr").returncode == 0
    with pytest.raises(InputError, match="no batch named 'pr' any more"):
        pipeline.admission.cancel_waiting("pr", 100)  # the step after cancel's check
    assert not client.exists(keys.batch("pr"))
    enqueue = vidq(pipeline, "enqueue", str(write_prompts(tmp_path / "new.txt", ["anew"])),
                    "--batch", "pr")
    assert enqueue.returncode == 0, enqueue


def test_a_pause_or_limit_landing_after_a_purge_leaves_no_stray_setting(
        make_pipeline, make_sandbox, tmp_path):
    """`vidq pause` (and resume, limits, priority) check the batch exists,
    then write the setting: a purge ending in between left a hash of
    `paused=1` alone, and the next batch of the name waited, paused, with
    nobody having paused it. The write now needs the batch."""
    pipeline = _failed_batch(make_pipeline, make_sandbox, tmp_path, ["REJECT gone"])
    client = pipeline.store.redis
    assert vidq(pipeline, "purge", "pr").returncode == 0
    writes = [{"paused": "1"}, {"paused": None}, {"max_videos": "3"}, {"priority": "low"}]
    for values in writes:  # each, the step after its command's check
        with pytest.raises(InputError, match="no batch named 'pr' any more"):
            pipeline.admission.configure("pr", values, existing=True)
    assert not client.exists(keys.batch("pr"))
    enqueue = vidq(pipeline, "enqueue", str(write_prompts(tmp_path / "new.txt", ["anew"])),
                   "--batch", "pr")
    assert enqueue.returncode == 0, enqueue
    assert "paused" not in vidq(pipeline, "status", "pr").stdout
    assert client.hmget(keys.batch("pr"), "paused", "max_videos") == [None, None]
    wait_until(lambda: pipeline.store.counts("pr")["done"] == 1, 60, "the new batch's video")


def test_an_enqueue_whose_batch_is_purged_while_it_writes_says_what_was_not_enqueued(
        make_pipeline, make_sandbox, monkeypatch):
    """A purge marks the batch (its writes are refused from then on) and ends
    between two pipelines of an enqueue: the mark was gone by the enqueue's
    last check, so the refused jobs vanished, and the command said "2 new"
    of which one was never written. It now says what was not enqueued."""
    from worker import admission as admission_module
    from worker.retention import purge

    pipeline = make_pipeline(make_sandbox())
    client = pipeline.store.redis
    monkeypatch.setattr(admission_module, "ENQUEUE_PIPELINE", 1)
    request = {"model": "alibaba/wan2.1-t2v-turbo", "prompt": "a fox"}

    def jobs():
        yield "first", request
        assert begin_purge(client, "pr", "")  # `vidq purge pr --force`, its mark...
        yield "second", {**request, "prompt": "a whale"}
        purge(client, "pr", pipeline.settings)  # ...then its removal

    with pytest.raises(InputError, match="'pr' was purged while this enqueue ran: 1 jobs were "
                                         "written before .* 1 were not enqueued"):
        pipeline.admission.enqueue("pr", jobs(), time.time())
    assert not client.exists(keys.batch("pr"), keys.batch_jobs("pr"))


def test_a_purge_waits_for_an_enqueue_writing_into_its_batch(make_pipeline, make_sandbox,
                                                             tmp_path):
    """An enqueue holds its batch's lock while it writes. A purge that ended
    between two of its writes left the later jobs in a batch nobody listed
    (no name in `vidq batches`, its settings gone), run and paid all the same
    (review 144). `vidq purge` now takes the same lock: it waits, saying so,
    and purges once the enqueue is over."""
    import os

    from worker.leases import held_lock

    pipeline = _failed_batch(make_pipeline, make_sandbox, tmp_path, ["REJECT gone"])
    client = pipeline.store.redis
    wait_until(lambda: manifest.read_marks(client, ["pr"])["pr"].manifest_current, 60,
               "the manifest")
    env = {**os.environ, "VIDQ_REDIS_URL": pipeline.settings.redis_url,
           "VIDQ_STORAGE_URL": pipeline.env["VIDQ_STORAGE_URL"]}
    with held_lock(client, keys.batch_enqueue_lock("pr"), 30):  # an enqueue writing
        purge = subprocess.Popen(["vidq", "purge", "pr"], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        first = purge.stdout.readline()  # said 2 s into its wait (its start may be slow)
        assert first.startswith("waiting for an enqueue of batch 'pr' to end"), first
        time.sleep(1)
        assert purge.poll() is None and client.exists(keys.batch("pr"))
    out, _ = purge.communicate(timeout=60)
    assert purge.returncode == 0, first + out
    assert not client.exists(keys.batch("pr"), keys.batch_jobs("pr"))
