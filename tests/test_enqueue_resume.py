"""An enqueue that dies half-way: its batch is listed at once, and the same
command again finishes the file, adding nothing twice, even when the file
holds several takes (parameters) of one prompt.

Real parts: the `vidq` command as a subprocess, SIGKILLed mid-write, and the
test Redis.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from worker import keys

VIDQ = [sys.executable, "-c", "from producer.cli import main; main()"]


def _env(redis_url: str) -> dict:
    env = {**os.environ, "VIDQ_REDIS_URL": redis_url}
    env.pop("VIDQ_STORAGE_URL", None)
    return env


def _two_takes_each(path, prompts: int):
    with path.open("w") as out:
        for i in range(prompts):
            for resolution in ("480P", "720P"):
                out.write(json.dumps({"prompt": f"a heron at dawn, take {i}",
                                      "resolution": resolution}) + "\n")
    return path


@pytest.mark.slow
def test_an_enqueue_killed_half_way_is_listed_and_the_same_command_finishes_it(
        redis_url, tmp_path):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    path = _two_takes_each(tmp_path / "takes.jsonl", 20_000)
    command = VIDQ + ["enqueue", str(path), "--batch", "takes"]
    first = subprocess.Popen(command, env=_env(redis_url), cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while client.scard(keys.batch_jobs("takes")) < 1 and first.poll() is None:
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    first.wait()
    written = client.scard(keys.batch_jobs("takes"))
    assert 0 < written < 40_000, f"not killed half-way: {written} jobs written"

    listed = subprocess.run(VIDQ + ["batches", "--json"], env=_env(redis_url), cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "takes" in [row["batch"] for row in json.loads(listed.stdout)]

    again = subprocess.run(command, env=_env(redis_url), cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"({40_000 - written:,} new, {written:,} already enqueued)" in again.stdout
    # It waits for the killed producer's lock, saying so (it looked hung for ~30 s).
    assert ("waiting for another enqueue of batch 'takes' to end (or, if it was stopped, "
            "for its lock to lapse: up to ") in again.stderr
    assert client.scard(keys.batch_jobs("takes")) == 40_000
    assert int(client.hget(keys.batch("takes"), "total")) == 40_000


@pytest.mark.slow
def test_two_producers_with_other_flags_at_once_never_both_enqueue(redis_url, tmp_path):
    """The same 300 prompts into one batch at once, one at 720P and one at
    480P, neither with --allow-variants: one gets in, the other is refused.
    Both used to pass the variants check before either wrote (3 in 12 tries),
    and every prompt was paid twice."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    path = tmp_path / "p.txt"
    path.write_text("".join(f"a lighthouse in fog {i}\n" for i in range(300)))
    for attempt in range(10):
        batch = f"mixed{attempt}"
        both = [subprocess.Popen(VIDQ + ["enqueue", str(path), "--batch", batch, *flags],
                                 env=_env(redis_url), cwd=tmp_path, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
                for flags in ([], ["--resolution", "480P"])]
        codes = sorted(process.wait(timeout=120) for process in both)
        assert codes == [0, 2], (attempt, codes)
        assert client.scard(keys.batch_jobs(batch)) == 300


def test_a_line_spelling_a_default_finds_the_job_that_left_it_out(redis_url, tmp_path):
    """A batch run from a file that spelled `"resolution": "720P"`, enqueued
    again from one that leaves it out (and back): the same requests, under
    other digest ids. Each was a new job and a second charge; now none is,
    and no variant is claimed."""
    spelled = tmp_path / "spelled.jsonl"
    spelled.write_text("".join(json.dumps({"prompt": f"a lantern {i}", "resolution": "720P"})
                               + "\n" for i in range(3)))
    plain = tmp_path / "plain.txt"
    plain.write_text("".join(f"a lantern {i}\n" for i in range(3)))
    env = _env(redis_url)

    outputs = []
    for path in (spelled, plain, spelled):
        done = subprocess.run([*VIDQ, "enqueue", str(path), "--batch", "lanterns"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)

    assert "(3 new, 0 already enqueued)" in outputs[0]
    assert all("(0 new, 3 already enqueued)" in out for out in outputs[1:]), outputs
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.scard(keys.batch_jobs("lanterns")) == 3


def test_a_line_with_its_own_id_is_the_users_take_whatever_the_batch_has(redis_url, tmp_path):
    """The batch has a fox. A line `{"id": "hero", ...the fox, "resolution":
    "720P"}` asks the same under an id of the user's: a take of its own (the
    upstream draws a new video), created, not "already there" and not a
    variant, as two named lines asking the same in one file are; a file of
    such twins killed half-way resumed with a variants refusal (review 91).
    A line without an id asking the same is already there."""
    plain = tmp_path / "p.txt"
    plain.write_text("a red fox\n")
    hero = tmp_path / "hero.jsonl"
    hero.write_text(json.dumps({"id": "hero", "prompt": "a red fox", "resolution": "720P"}))
    spelled = tmp_path / "spelled.jsonl"
    spelled.write_text(json.dumps({"prompt": "a red fox", "resolution": "720P"}))
    env = _env(redis_url)

    def enqueue(path):
        return subprocess.run([*VIDQ, "enqueue", str(path), "--batch", "heroes"],
                              env=env, capture_output=True, text=True, timeout=60)

    assert enqueue(plain).returncode == 0
    taken = enqueue(hero)
    assert taken.returncode == 0 and "(1 new, 0 already enqueued)" in taken.stdout, taken
    again = enqueue(spelled)
    assert again.returncode == 0 and "(0 new, 1 already enqueued)" in again.stdout, again
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.scard(keys.batch_jobs("heroes")) == 2
    assert "hero" in client.smembers(keys.batch_jobs("heroes"))


def test_a_producer_stopped_past_its_lock_writes_nothing_once_another_enqueued(
        redis_url, tmp_path):
    """Producer A holds the batch's lock and has passed its variants check
    when it stands still (SIGSTOP, a suspended laptop) past the lock's TTL;
    producer B enqueues the same prompts at 480P meanwhile. A used to write
    its jobs on waking, and every prompt was paid twice (review 114). Here
    the lapse is the lock key gone, as its TTL makes it, and B runs inside
    A's plan check."""
    from producer.enqueue import enqueue_file, open_admission
    from worker.errors import InputError
    from worker.settings import Settings

    path = tmp_path / "p.txt"
    path.write_text("".join(f"a kite over dunes {i}\n" for i in range(50)))
    settings = Settings.from_env({"VIDQ_REDIS_URL": redis_url, "AIMLAPI_KEY": "k"})
    producer_a, producer_b = open_admission(settings), open_admission(settings)
    defaults = {"model": "alibaba/wan2.1-t2v-turbo"}
    sent = []

    def stood_still(requests):
        producer_a.redis.delete(keys.batch_enqueue_lock("kites"))
        done = enqueue_file(producer_b, path, "kites", {**defaults, "resolution": "480P"},
                            lambda *call: sent.append(call))
        assert done.created == 50

    with pytest.raises(InputError, match="lost its lock.*0 new jobs had been written"):
        enqueue_file(producer_a, path, "kites", defaults, lambda *call: sent.append(call),
                     check_plan=stood_still)
    client = producer_a.redis
    assert client.scard(keys.batch_jobs("kites")) == 50
    assert int(client.hget(keys.batch("kites"), "total")) == 50
    resolutions = {json.loads(client.hget(keys.job(keys.job_ref("kites", job_id)), "request"))
                   .get("resolution") for job_id in client.smembers(keys.batch_jobs("kites"))}
    assert resolutions == {"480P"}

    again = subprocess.run([*VIDQ, "enqueue", str(path), "--batch", "kites"],
                           env=_env(redis_url), capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "only by parameters (resolution)" in again.stderr
    assert client.scard(keys.batch_jobs("kites")) == 50


def test_a_stray_bom_or_empty_negative_prompt_asks_what_the_batch_has(redis_url, tmp_path):
    """`cat a.txt b.txt`, b saved with a BOM: its first prompt carries the BOM
    into the joined file. Enqueued into the batch that has the prompt, it
    made a second job and charge, and with --resolution 480P passed the
    variants check (review 114). A `"negative_prompt": ""` is no negative
    prompt, as an empty CSV cell is: it made another job too."""
    plain = tmp_path / "a.txt"
    plain.write_text("a blue heron at dusk\n")
    joined = tmp_path / "all.txt"
    joined.write_bytes(b"a red fox\n\xef\xbb\xbfa blue heron at dusk\n")
    empty_negative = tmp_path / "n.jsonl"
    empty_negative.write_text(json.dumps({"prompt": "a blue heron at dusk",
                                          "negative_prompt": ""}) + "\n")
    env = _env(redis_url)

    def enqueue(path, *flags):
        return subprocess.run([*VIDQ, "enqueue", str(path), "--batch", "herons", *flags],
                              env=env, capture_output=True, text=True, timeout=60)

    assert enqueue(plain).returncode == 0
    variant = enqueue(joined, "--resolution", "480P")
    assert variant.returncode == 2, variant.stdout
    assert "1 new job differs from jobs already in batch 'herons'" in variant.stderr
    joined_in = enqueue(joined)
    assert joined_in.returncode == 0, joined_in.stderr
    assert "(1 new, 1 already enqueued)" in joined_in.stdout
    negative = enqueue(empty_negative)
    assert negative.returncode == 0 and "(0 new, 1 already enqueued)" in negative.stdout
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.scard(keys.batch_jobs("herons")) == 2


def test_a_file_named_in_latin_1_is_enqueued_and_reported_by_its_name(redis_url, tmp_path):
    """A prompt file whose name is not UTF-8 (`café.txt` from an old zip):
    the enqueue died with a traceback after listing the batch and setting
    its priority, a batch of 0 jobs that `vidq status` did not know (review
    114). Now its jobs go in, and the report names the file with the byte
    escaped."""
    name = os.fsencode(tmp_path) + b"/caf\xe9.txt"
    with open(name, "wb") as out:
        out.write(b"a heron\na fox\n")
    env = _env(redis_url)
    done = subprocess.run([*VIDQ, "enqueue", name, "--batch", "latin", "--priority", "high"],
                          env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"(2 new, 0 already enqueued)" in done.stdout
    report = subprocess.run([*VIDQ, "report", "latin"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    rows = [json.loads(line) for line in report.stdout.splitlines()]
    assert [(row["line"], row["file"]) for row in rows] == [
        (1, f"{tmp_path}/caf\\xe9.txt"), (2, f"{tmp_path}/caf\\xe9.txt")]


def test_two_batches_named_but_for_case_enqueued_at_once_are_never_both_created(
        redis_url, tmp_path):
    """`Night` and `night` enqueued at once: both passed the twin check before
    either was listed (the locks were per name; review 115). One lock for
    both names now: the second waits, then is refused."""
    import threading

    from producer.enqueue import enqueue_file, open_admission
    from worker.errors import InputError
    from worker.settings import Settings

    path = tmp_path / "p.txt"
    path.write_text("a heron\n")
    settings = Settings.from_env({"VIDQ_REDIS_URL": redis_url, "AIMLAPI_KEY": "k"})
    defaults = {"model": "alibaba/wan2.1-t2v-turbo"}
    outcome = []

    def other_case():
        try:
            enqueue_file(open_admission(settings), path, "night", defaults, lambda *_: None)
            outcome.append("created")
        except InputError as exc:
            outcome.append(str(exc))

    second = threading.Thread(target=other_case)

    def while_checked(requests):  # the first has passed its twin check
        second.start()
        time.sleep(1.0)

    enqueue_file(open_admission(settings), path, "Night", defaults, lambda *_: None,
                 check_plan=while_checked)
    second.join(timeout=60)
    assert outcome and "differs only in case from batch 'Night'" in outcome[0], outcome
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.smembers(keys.BATCHES) == {"Night"}


def test_a_batch_named_as_another_but_for_case_is_refused(redis_url, tmp_path):
    """`Night` and `night` are one directory on macOS or Windows: the second
    batch's manifest would overwrite the first's (review 114). Job ids were
    checked for case twins; batch names now are too."""
    path = tmp_path / "p.txt"
    path.write_text("a heron\n")
    env = _env(redis_url)

    def enqueue(batch):
        return subprocess.run([*VIDQ, "enqueue", str(path), "--batch", batch], env=env,
                              capture_output=True, text=True, timeout=60)

    assert enqueue("Night").returncode == 0
    refused = enqueue("night")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "error: batch name 'night' differs only in case from batch 'Night': on a "
        "case-insensitive disk (macOS, Windows) both would be one directory (nothing was "
        "enqueued)")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.smembers(keys.BATCHES) == {"Night"}
    assert enqueue("Night").returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_an_enqueue_stopped_by_a_signal_says_what_it_left_to_run(redis_url, tmp_path, sig):
    """Ctrl-C, a SIGTERM (`timeout`, a service manager) or a closed terminal
    after some jobs were written: those jobs run and are paid for. The
    command said only "Aborted!" (or nothing, on SIGTERM, its lock held 30 s
    more), and a user enqueuing the file again under another name paid for
    them twice (review 139). It now says how many were written and how to go
    on, releases its lock, and exits 128 + the signal; the same command again
    finishes the file at once."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    lines = 40_000
    path = tmp_path / "night.txt"
    path.write_text("".join(f"a lighthouse in fog {i}\n" for i in range(lines)))
    command = VIDQ + ["enqueue", str(path), "--batch", "night"]
    process = subprocess.Popen(command, env=_env(redis_url), cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while client.scard(keys.batch_jobs("night")) < 1 and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(sig)
    _out, err = process.communicate(timeout=60)
    written = client.scard(keys.batch_jobs("night"))
    assert 0 < written < lines, f"not stopped half-way: {written} jobs written"
    assert process.returncode == 128 + sig, (process.returncode, err)
    told = err.strip().splitlines()[-1]
    assert told.startswith("interrupted: at least ") and "will run" in told, err
    assert int(told.split("at least ")[1].split()[0]) <= written
    assert "`vidq cancel night`" in told and "the same command again" in told
    assert not client.exists(keys.batch_enqueue_lock("night"))

    started = time.monotonic()
    again = subprocess.run(command, env=_env(redis_url), cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert client.scard(keys.batch_jobs("night")) == lines
    assert f"{written:,} already enqueued" in again.stdout or str(written) in again.stdout
    assert time.monotonic() - started < 25  # no wait for a dead producer's lock
