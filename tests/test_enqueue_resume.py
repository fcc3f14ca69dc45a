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
    assert f"({40_000 - written} new, {written} already enqueued)" in again.stdout
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
