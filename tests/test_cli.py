"""The `vidq` command as a user runs it: exit codes, messages, Redis contents."""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import redis
import requests
from conftest import FAST_WORKER_ENV, wait_until, write_prompts

BAD_FILES = {
    "empty_prompt.jsonl": ('{"prompt": "ok"}\n{"prompt": "  "}\n', ["line 2", "prompt"]),
    "broken.jsonl": ('{"prompt": "ok"}\n{"prompt": "unterminated\n', ["line 2"]),
    "resolution.jsonl": ('{"prompt": "ok", "resolution": "1080P"}\n', ["line 1", "resolution"]),
    "dup.jsonl": ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n',
                  ["line 2", "duplicate id 'a'", "line 1"]),
    "empty.txt": ("", ["no prompts"]),
}


def vidq(*args, redis_url: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "VIDQ_REDIS_URL": redis_url}
    return subprocess.run(["vidq", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_rejected_with_line_numbers_and_nothing_enqueued(name, redis_url, tmp_path):
    """A bad prompt file exits non-zero, names each bad line, and writes nothing."""
    content, expected = BAD_FILES[name]
    path = tmp_path / name
    path.write_text(content)

    result = vidq("enqueue", str(path), "--batch", "bad", redis_url=redis_url)

    assert result.returncode != 0
    for fragment in expected:
        assert fragment in result.stderr, result.stderr
    assert redis.Redis.from_url(redis_url).keys("vidq:*") == []


def test_every_bad_line_is_listed(redis_url, tmp_path):
    """All bad lines are reported together, each with its number."""
    path = tmp_path / "many.jsonl"
    path.write_text('{"prompt": ""}\n{"prompt": "fine"}\nnot json\n'
                    '{"prompt": "x", "aspect_ratio": "2:1"}\n')

    result = vidq("enqueue", str(path), "--batch", "bad", redis_url=redis_url)

    assert result.returncode != 0
    for line in ("line 1", "line 3", "line 4"):
        assert line in result.stderr
    assert "line 2" not in result.stderr


def test_enqueue_twice_creates_no_new_jobs_and_status_json(redis_url, tmp_path):
    """Re-enqueueing a file adds nothing; `status --json` prints one object of counts."""
    path = tmp_path / "p.txt"
    path.write_text("# comment\none\n\ntwo\nthree\n")

    first = vidq("enqueue", str(path), "--batch", "night-1", redis_url=redis_url)
    second = vidq("enqueue", str(path), "--batch", "night-1", redis_url=redis_url)
    status = vidq("status", "night-1", "--json", redis_url=redis_url)

    assert first.returncode == 0 and "3 new" in first.stdout
    assert second.returncode == 0 and "0 new" in second.stdout
    report = json.loads(status.stdout)
    assert report["batch"] == "night-1" and report["total"] == 3
    assert sum(report["counts"].values()) == 3


def test_enqueue_says_when_duplicate_lines_became_one_job(redis_url, tmp_path):
    """Three lines, two of them the same prompt: two jobs, and the line that
    seems lost is accounted for; one job is 'job', not 'jobs'."""
    twice = tmp_path / "twice.txt"
    twice.write_text("a harbour at dawn\na lighthouse\na harbour at dawn\n")
    once = tmp_path / "once.txt"
    once.write_text("a single shot\n")

    merged = vidq("enqueue", str(twice), "--batch", "dup-1", redis_url=redis_url)
    single = vidq("enqueue", str(once), "--batch", "one-1", redis_url=redis_url)

    assert ("\nbatch dup-1: 2 jobs (2 new, 0 already enqueued, 1 duplicate line(s) merged "
            "into one job each)\n") in merged.stdout
    assert "\nbatch one-1: 1 job (1 new, 0 already enqueued)\n" in single.stdout


def test_same_id_with_new_parameters_is_refused(redis_url, tmp_path):
    """An id already in the batch with other parameters is an error, not an overwrite."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "shot-1", "prompt": "a cat"}\n')
    assert vidq("enqueue", str(path), "--batch", "b", redis_url=redis_url).returncode == 0
    path.write_text('{"id": "shot-1", "prompt": "a dog"}\n')

    result = vidq("enqueue", str(path), "--batch", "b", redis_url=redis_url)

    assert result.returncode != 0 and "already exists" in result.stderr


def test_run_without_key_or_sandbox_refuses(redis_url, tmp_path):
    """`vidq run` with no API key and no --sandbox says what to do."""
    path = tmp_path / "p.txt"
    path.write_text("a prompt\n")
    env_key = {k: "" for k in ("AIMLAPI_KEY", "AIML_API_KEY")}
    result = subprocess.run(["vidq", "run", str(path)], capture_output=True, text=True,
                            env={**os.environ, **env_key, "VIDQ_REDIS_URL": redis_url},
                            cwd=tmp_path, timeout=60)
    assert result.returncode != 0
    assert "AIMLAPI_KEY" in result.stderr and "--sandbox" in result.stderr


def test_worker_without_key_refuses_to_start(redis_url, tmp_path):
    """`celery -A worker worker` with no API key exits at once and says which variable."""
    env = {k: v for k, v in os.environ.items() if k not in ("AIMLAPI_KEY", "AIML_API_KEY")}
    env["VIDQ_REDIS_URL"] = redis_url
    result = subprocess.run(["celery", "-A", "worker", "worker", "-Q", "vidq.submit", "-c", "1"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: no API key: set AIMLAPI_KEY (or AIML_API_KEY)\n"


def test_failure_reasons_fold_counts_not_names():
    """`vidq status` groups reasons that differ only in their numbers, but the
    model's name is not a number: it read 'alibaba/wanN-tNv-turbo'."""
    from producer.batch_view import reason_group

    rejected = "submit: HTTP 400: model: 'x' is not one of ['alibaba/wan2.1-t2v-turbo']"
    assert reason_group(rejected) == ("submit: HTTP N: model: 'x' is not one of "
                                      "['alibaba/wan2.1-t2v-turbo']")
    assert (reason_group("timeout: still 'generating' after 86412 s (hard limit)")
            == reason_group("timeout: still 'generating' after 86417.5 s (hard limit)"))


def test_failure_reasons_that_name_their_job_are_one_reason():
    """Eight jobs failed on S3 lookups of their own keys: one reason, not eight
    lines of '1 x' (their ids, folded digit by digit, read 'p-N8d87b')."""
    from producer.batch_view import top_reasons
    from worker.retry import Failure

    found = [Failure(job_id, f"submit: gave up after 8 attempts: cannot look up "
                             f"s3://b/night/{job_id}.json: EndpointConnectionError", "", False)
             for job_id in ("p-3f8d87b1", "p-9a0c", "p-77e2d1")]
    assert top_reasons(found)["top_reasons"] == [{
        "reason": "submit: gave up after N attempts: cannot look up s3://b/night/<job>.json: "
                  "EndpointConnectionError", "count": 3}]
    # Short numeric ids (CSV rows) are replaced in paths only.
    full = [Failure(str(i), f"download: gave up after 8 attempts: cannot write "
                            f"/v/night/{i}.mp4: [Errno 28] No space left", "", False)
            for i in (2, 8, 28)]
    assert top_reasons(full)["top_reasons"] == [{
        "reason": "download: gave up after N attempts: cannot write /v/night/<job>.mp4: "
                  "[Errno N] No space left", "count": 3}]


@pytest.mark.slow
def test_a_second_shell_reads_the_batch_of_the_vidq_run_going_on_here(make_sandbox, tmp_path):
    """`vidq run` keeps its batch in a Redis of its own. `vidq status` typed in
    a second shell, in the same directory and with no VIDQ_REDIS_URL, read the
    default Redis instead and said there was no such batch. It reads the run's,
    and says so on stderr (stdout stays one JSON document). A `vidq enqueue`
    there wrote its jobs to the run's Redis but sent their tasks to the default
    one: they waited a step grace (here 120 s) for the run's workers to send
    them again. They are POSTed at once."""
    sandbox = make_sandbox(time_scale=3, max_concurrency=0)  # ~30 s generations
    env = {name: value for name, value in os.environ.items()
           if name not in ("VIDQ_REDIS_URL", "AIML_API_KEY", "VIDQ_ENDPOINT")}
    env.update(FAST_WORKER_ENV)
    env.update({"AIMLAPI_BASE_URL": sandbox.url, "AIMLAPI_KEY": sandbox.config.api_key,
                "VIDQ_STORAGE_URL": (tmp_path / "videos").as_uri(), "VIDQ_MAX_IN_FLIGHT": "2",
                "VIDQ_STEP_GRACE_S": "120"})
    path = write_prompts(tmp_path / "night.txt", [f"watched {i}" for i in range(2)])
    extra = write_prompts(tmp_path / "extra.txt", [f"added {i}" for i in range(2)])
    run = subprocess.Popen(["vidq", "run", str(path)], env=env, cwd=tmp_path, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def second_shell(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["vidq", *args], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)

    try:
        wait_until(lambda: len(requests.get(sandbox.url + "/__ledger", timeout=5).json()) == 2,
                   60, "the run's two POSTs")
        status = second_shell("status", "night", "--json")
        added = [second_shell("cap", "4"), second_shell("enqueue", str(extra), "--batch", "x")]
        wait_until(lambda: len(requests.get(sandbox.url + "/__ledger", timeout=5).json()) == 4,
                   60, "the second shell's jobs POSTed by the run's workers")
    finally:
        run.send_signal(2)
        output, _ = run.communicate(timeout=60)

    assert status.returncode == 0, status.stderr + output
    assert json.loads(status.stdout)["total"] == 2
    assert [result.returncode for result in added] == [0, 0], [r.stderr for r in added]
    url = re.search(r"private Redis at (\S+),", output)
    assert url, output
    assert (f"using the Redis of the `vidq run` in {tmp_path.resolve() / '.vidq'} "
            f"({url.group(1)})") in status.stderr, status.stderr


def test_only_a_running_redis_of_the_state_dir_is_named(tmp_path):
    """What a stopped or killed run left behind never redirects a command."""
    from producer.redis_server import PID_FILE, URL_FILE, PrivateRedis, running_url

    state = tmp_path / "redis"
    with PrivateRedis(state) as server:
        assert running_url(state) == server.url
    assert running_url(state) is None  # stopped: its files are gone
    ended = subprocess.Popen(["true"])
    ended.wait()
    for pid in (ended.pid, os.getpid()):  # a dead pid, and a live one of no redis-server
        (state / PID_FILE).write_text(str(pid))
        (state / URL_FILE).write_text(server.url)
        assert running_url(state) is None
    # A crafted .vidq in a checked-out directory: a live redis-server's pid and
    # another host, or a file of another user's, never redirect a command.
    with PrivateRedis(state) as server:
        (state / URL_FILE).write_text(server.url.replace("127.0.0.1", ":x@elsewhere.invalid"))
        assert running_url(state) is None
        (state / URL_FILE).write_text(server.url)
        os.chown(state / URL_FILE, 12345, -1)
        assert running_url(state) is None
    # Or the pid and port of a Redis running elsewhere (guessed): not in this directory.
    with PrivateRedis(tmp_path / "elsewhere") as other:
        (state / PID_FILE).write_text(str(other.process.pid))
        (state / URL_FILE).write_text(other.url)
        assert running_url(state) is None


def test_only_celery_worker_processes_are_named_as_a_runs_workers():
    """Flower or `celery inspect` on the same Redis are not workers to stop."""
    from producer.redis_server import _is_celery_worker

    assert _is_celery_worker([b"python3", b"-m", b"celery", b"-A", b"worker", b"worker", b"-c"])
    assert not _is_celery_worker([b"celery", b"-A", b"worker", b"flower"])
    assert not _is_celery_worker([b"celery", b"-A", b"worker", b"inspect", b"active"])


def test_a_worker_delivering_only_webhooks_is_not_a_worker_for_the_batch(make_pipeline, tmp_path):
    """Only a webhook pool is up: no job moves, but `vidq status` counted it as
    a live worker, gave an ETA of seconds and no warning, for as long as one
    cared to look."""
    from worker.celery_app import WEBHOOK_QUEUE

    pipeline = make_pipeline()
    pipeline.start_workers(queues=[WEBHOOK_QUEUE])
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["stands still"]), "still")

    status = vidq("status", "still", "--json", redis_url=pipeline.settings.redis_url)
    shown = vidq("status", "still", redis_url=pipeline.settings.redis_url)

    assert status.returncode == 0, status.stderr
    found = json.loads(status.stdout)
    assert found["workers_alive"] == 0 and found["eta_s"] is None, found
    assert "warning: no worker is alive that runs steps" in shown.stdout, shown.stdout


def test_a_pid_now_another_redis_is_never_stopped_or_named(tmp_path):
    """The state dir's pid file names a redis-server that is not its own (the
    pid reused by another Redis, say the machine's): `vidq run` starting there
    neither refuses naming it nor stops it as a killed run's orphan."""
    from producer.redis_server import OWNER_FILE, PID_FILE, PrivateRedis

    with PrivateRedis(tmp_path / "elsewhere") as other:
        state = tmp_path / "state"
        state.mkdir()
        (state / PID_FILE).write_text(str(other.process.pid))
        (state / OWNER_FILE).write_text("1")
        with PrivateRedis(state) as mine:
            assert mine.left_by_killed_run == 0
        assert other.process.poll() is None


def test_the_enqueue_line_separates_thousands_as_plan_does():
    """`vidq plan` said "10,000 videos" and `vidq enqueue` "10000 jobs"."""
    from producer.enqueue import EnqueueResult

    line = EnqueueResult("night", 10_000, 9_998, 2, 0).summary()
    assert line == "batch night: 10,000 jobs (9,998 new, 2 already enqueued)"
