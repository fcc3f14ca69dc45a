"""`vidq run` keeps its state on disk: a re-run, or a run after Ctrl-C, POSTs
nothing twice. The upstream is a sandbox started by the test, so its ledger
outlives each run and counts every generation."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import av
import psutil
import pytest
import redis
import requests
from conftest import FAST_WORKER_ENV, wait_for_log, wait_until, write_prompts

from producer.local import stop_processes
from worker import keys


def _env(sandbox, tmp_path) -> dict:
    env = dict(os.environ)
    for name in ("VIDQ_REDIS_URL", "AIML_API_KEY", "VIDQ_ENDPOINT"):
        env.pop(name, None)
    env.update(FAST_WORKER_ENV)
    env.update({"AIMLAPI_BASE_URL": sandbox.url, "AIMLAPI_KEY": sandbox.config.api_key,
                "VIDQ_STORAGE_URL": (tmp_path / "videos").as_uri(), "VIDQ_MAX_IN_FLIGHT": "4"})
    return env


def _run(path, tmp_path, env, *extra) -> subprocess.CompletedProcess:
    command = ["vidq", "run", str(path), "--state-dir", str(tmp_path / "state"), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180,
                          cwd=tmp_path)


def _start_run(path, tmp_path, env, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """`vidq run` in the background (after `prefix`, e.g. nohup)."""
    return subprocess.Popen([*prefix, "vidq", "run", str(path), "--state-dir",
                             str(tmp_path / "state")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path)


def _start_run_until_posted(path, tmp_path, env, sandbox, posted: int,
                            prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """`vidq run` in the background, returned once the sandbox has `posted` generations."""
    process = _start_run(path, tmp_path, env, prefix)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(_ledger(sandbox).values()) < posted:
        time.sleep(0.2)
    return process


def _ledger(sandbox) -> Counter:
    entries = requests.get(sandbox.url + "/__ledger", timeout=10).json()
    return Counter(entry["prompt"] for entry in entries)


def _read_after_the_run(env: dict, tmp_path, batch: str, done: int) -> None:
    """The run is over and its Redis stopped; no Redis is where the shell
    points either (here a closed port, on a laptop the default 6379): the
    manifest is what is left. `vidq report` and `status` said "cannot use
    Redis" and exited 2."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    shell = {**env, "VIDQ_REDIS_URL": f"redis://127.0.0.1:{closed}/0"}
    report = subprocess.run(["vidq", "report", batch], env=shell, capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    status = subprocess.run(["vidq", "status", batch], env=shell, capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert report.returncode == 0 and status.returncode == 0, report.stderr + status.stderr
    rows = [json.loads(line) for line in report.stdout.splitlines()]
    assert [row["state"] for row in rows] == ["done"] * done
    assert all(Path(row["storage_url"].removeprefix("file://")).is_file() for row in rows)
    assert f"from its manifest: {done} done" in status.stdout
    assert "cannot be reached: batch night is read from its manifest in storage" in (
        report.stderr)


@pytest.mark.slow
def test_running_the_same_file_twice_posts_nothing_the_second_time(make_sandbox, tmp_path):
    sandbox = make_sandbox()
    env = _env(sandbox, tmp_path)
    prompts = ["first light", "second light", "third light"]
    path = write_prompts(tmp_path / "night.txt", prompts)

    first = _run(path, tmp_path, env)
    assert first.returncode == 0, first.stdout + first.stderr
    _read_after_the_run(env, tmp_path, "night", done=3)
    second = _run(path, tmp_path, env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "3 already enqueued" in second.stdout
    assert _ledger(sandbox) == Counter({p: 1 for p in prompts})
    assert len(list((tmp_path / "videos" / "night").glob("*.mp4"))) == 3

    # The Redis state is lost, the videos are not: storage says they are done.
    subprocess.run(["rm", "-rf", str(tmp_path / "state")], check=True)
    third = _run(path, tmp_path, env)
    assert third.returncode == 0, third.stdout + third.stderr
    assert _ledger(sandbox) == Counter({p: 1 for p in prompts})


@pytest.mark.slow
def test_two_files_whose_names_make_one_batch_name_are_never_one_batch(make_sandbox,
                                                                        tmp_path):
    """`vidq run FILE` names the batch after the file's ASCII letters: 東京.txt
    and 大阪.txt both make `batch`. The second run joined the first's batch,
    and its summary, exit status, manifest and --retry covered the other
    file's jobs (review 139). It is now refused, enqueuing nothing; with
    --batch it runs on its own, and the first file's rerun still resumes."""
    sandbox = make_sandbox()
    env = _env(sandbox, tmp_path)
    tokyo = write_prompts(tmp_path / "東京.txt", ["a red fox in the snow", "a tram at night"])
    osaka = write_prompts(tmp_path / "大阪.txt", ["a red fox in the snow", "a castle in rain"])
    assert _run(tokyo, tmp_path, env).returncode == 0

    refused = _run(osaka, tmp_path, env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert ("batch 'batch', the name made of '大阪.txt', holds the prompts of '東京.txt': give "
            "this file's batch a name with --batch NAME") in refused.stderr
    assert _ledger(sandbox) == Counter({"a red fox in the snow": 1, "a tram at night": 1})

    named = _run(osaka, tmp_path, env, "--batch", "osaka")
    assert named.returncode == 0 and "2 new, 0 already enqueued" in named.stdout, named.stdout
    again = _run(tokyo, tmp_path, env)
    assert again.returncode == 0 and "2 already enqueued" in again.stdout, again.stdout
    assert _ledger(sandbox) == Counter({"a red fox in the snow": 2, "a tram at night": 1,
                                        "a castle in rain": 1})


def test_a_rerun_resumes_its_batch_whatever_other_files_added_to_it(redis_url, tmp_path):
    """The batch `vidq run 東京.txt` made also holds 40 jobs another file
    added (`--batch batch`): a sample of its jobs may name only that file,
    but the batch holds this file's own jobs, so the rerun resumes, every
    time; 大阪.txt's run is refused, every time."""
    from producer.enqueue import open_admission
    from producer.prompts import load_prompts
    from producer.run import _refuse_another_files_batch
    from worker.errors import InputError
    from worker.settings import Settings

    admission = open_admission(Settings.from_env({"VIDQ_REDIS_URL": redis_url}))
    defaults = {"model": "alibaba/wan2.1-t2v-turbo"}
    tokyo = write_prompts(tmp_path / "東京.txt", ["a red fox in the snow", "a tram at night"])
    osaka = write_prompts(tmp_path / "大阪.txt", ["a castle in rain"])
    for path in (tokyo, write_prompts(tmp_path / "more.txt", [f"more {i}" for i in range(40)])):
        admission.enqueue("batch", [(job.job_id, job.request, {"file": str(path)})
                                    for job in load_prompts(path, defaults).jobs], time.time())
    for _ in range(10):
        _refuse_another_files_batch(admission, "batch", tokyo, defaults)
        with pytest.raises(InputError, match="holds the prompts of"):
            _refuse_another_files_batch(admission, "batch", osaka, defaults)
    # Renamed: the same prompts, another name (review 144: refused, and the
    # advice, a new --batch name, bought them all again). A batch of exactly
    # its prompts resumes; one that holds others too is refused, saying that
    # its name buys nothing again (review 145: a file sharing some of
    # another's prompts joined its batch).
    renamed = write_prompts(tmp_path / "tokyo-night.txt", ["a red fox in the snow",
                                                           "a tram at night"])
    admission.enqueue("solo", [(job.job_id, job.request, {"file": str(tokyo)})
                               for job in load_prompts(tokyo, defaults).jobs], time.time())
    _refuse_another_files_batch(admission, "solo", renamed, defaults)
    with pytest.raises(InputError, match=r"2 of its 2 prompts are in it already"):
        _refuse_another_files_batch(admission, "batch", renamed, defaults)
    shares = write_prompts(tmp_path / "kyoto.txt", ["a red fox in the snow", "a temple"])
    with pytest.raises(InputError, match="1 of its 2 prompts are in it already "
                                         r"\(with --batch batch they are not bought again\)"):
        _refuse_another_files_batch(admission, "batch", shares, defaults)


@pytest.mark.slow
def test_ctrl_c_says_what_is_in_flight_and_the_rerun_resumes(make_sandbox, tmp_path):
    sandbox = make_sandbox(time_scale=15)  # ~6 s generations: in flight when interrupted
    env = _env(sandbox, tmp_path)
    env["VIDQ_EXPECTED_GENERATION_S"] = "6"
    prompts = [f"interrupted {i}" for i in range(6)]
    path = write_prompts(tmp_path / "night.txt", prompts)
    process = _start_run_until_posted(path, tmp_path, env, sandbox, posted=2)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)

    assert process.returncode == 130, output
    assert "in flight upstream" in output and "resume with: vidq run" in output
    rerun = _run(path, tmp_path, env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert _ledger(sandbox) == Counter({p: 1 for p in prompts})


@pytest.mark.slow
def test_vidq_run_restarts_a_worker_that_dies(make_sandbox, tmp_path):
    """SIGKILL the run's worker mid-batch: `vidq run` starts it again and the batch
    completes, each prompt POSTed once."""
    import psutil

    sandbox = make_sandbox(time_scale=30)
    env = _env(sandbox, tmp_path)
    env["VIDQ_EXPECTED_GENERATION_S"] = "3"
    prompts = [f"supervised {i}" for i in range(6)]
    path = write_prompts(tmp_path / "night.txt", prompts)
    process = _start_run_until_posted(path, tmp_path, env, sandbox, posted=2)
    # The sandbox counts a POST when it arrives, the worker records its id when the
    # answer does: a kill in between is an unknown outcome (never re-sent), not what
    # this test is about. The next POST waits for a 3 s generation to end.
    time.sleep(0.5)
    workers = [child for child in psutil.Process(process.pid).children()
               if "worker" in child.cmdline() and "vidq.webhook" not in child.cmdline()]
    assert workers, "no step worker process found under vidq run"
    os.killpg(workers[0].pid, signal.SIGKILL)
    output, _ = process.communicate(timeout=150)

    assert process.returncode == 0, output
    assert "starting it again" in output
    assert _ledger(sandbox) == Counter({p: 1 for p in prompts})


@pytest.mark.slow
def test_a_stored_video_is_taken_only_for_the_request_that_made_it(make_sandbox, tmp_path):
    """The Redis state is lost (a purge, retention, a deleted state dir) and the
    same explicit ids come back at 480P after a 720P night: the stored 720P
    videos are not taken as theirs; each is generated again, at 480P, and the
    paid 720P videos are kept whole, with their sidecars, in replaced/."""
    sandbox = make_sandbox()
    env = _env(sandbox, tmp_path)
    path = tmp_path / "shots.jsonl"
    lines = [{"id": f"shot{i}", "prompt": f"a tram in the rain {i}"} for i in range(2)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert _run(path, tmp_path, env).returncode == 0

    subprocess.run(["rm", "-rf", str(tmp_path / "state")], check=True)
    again = _run(path, tmp_path, env)  # the same requests: storage says done
    assert again.returncode == 0, again.stdout + again.stderr
    assert sum(_ledger(sandbox).values()) == 2

    subprocess.run(["rm", "-rf", str(tmp_path / "state")], check=True)
    path.write_text("".join(json.dumps({**line, "resolution": "480P"}) + "\n" for line in lines))
    lower = _run(path, tmp_path, env)
    assert lower.returncode == 0, lower.stdout + lower.stderr
    bodies = requests.get(sandbox.url + "/__ledger", timeout=10).json()
    assert [entry["body"].get("resolution") for entry in bodies] == [None, None, "480P", "480P"]
    first_night = {entry["id"]: entry for entry in bodies[:2]}
    for i in range(2):
        card = json.loads((tmp_path / "videos" / "shots" / f"shot{i}.json").read_text())
        assert card["parameters"]["resolution"] == "480P"
        with av.open(str(tmp_path / "videos" / "shots" / f"shot{i}.mp4")) as video:
            assert video.streams.video[0].height == 480
        [kept] = (tmp_path / "videos" / "shots" / "replaced").glob(f"shot{i}.*.mp4")
        old_card = json.loads(kept.with_suffix(".json").read_text())
        assert old_card["parameters"]["resolution"] == "720P"
        assert old_card["generation_id"] == kept.name.split(".")[1]
        paid = first_night[old_card["generation_id"]]
        assert hashlib.sha256(kept.read_bytes()).hexdigest() == old_card["sha256"] == paid["sha256"]
        with av.open(str(kept)) as video:
            assert video.streams.video[0].height == 720


def _journal(tmp_path) -> Counter:
    path = tmp_path / "state" / "sandbox-generations.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return Counter(json.loads(line)["prompt"] for line in lines)


def _sandbox_run_until_posted(path, tmp_path, env, posted: int,
                              every_s: float = 0.2) -> subprocess.Popen:
    """`vidq run PATH --sandbox`, once its sandbox has `posted` generations."""
    process = subprocess.Popen(["vidq", "run", str(path), "--sandbox", "--state-dir",
                                str(tmp_path / "state")], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(_journal(tmp_path).values()) < posted:
        time.sleep(every_s)
    return process


@pytest.mark.slow
def test_an_interrupted_sandbox_run_resumes_its_generations(tmp_path):
    """`vidq run --sandbox` starts a new sandbox on each run: the generations the
    first run created must still answer the second run's polls (they 404ed,
    and held every slot until the 24 h hard limit). One generation per prompt
    over both runs, every video stored, the manifest written and named."""
    env = _sandbox_env(tmp_path)
    prompts = [f"resumed {i}" for i in range(4)]
    path = write_prompts(tmp_path / "night.txt", prompts)
    process = _sandbox_run_until_posted(path, tmp_path, env, 2)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130 and "in flight upstream" in output, output

    rerun = _run(path, tmp_path, env, "--sandbox")

    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert _journal(tmp_path) == Counter({p: 1 for p in prompts})
    assert len(list((tmp_path / "videos" / "night").glob("*.mp4"))) == 4
    manifest = tmp_path / "videos" / "night" / "manifest.jsonl"
    assert f"every job's row: {manifest}" in rerun.stdout
    assert len(manifest.read_text().splitlines()) == 4


@pytest.mark.slow
def test_a_run_whose_own_redis_stops_says_so_at_once_and_the_rerun_finishes(tmp_path):
    """The run's private Redis dies (a full disk stops a Redis with appendfsync
    always): `vidq run` says so at once, naming its log, and how to resume, exit
    status 2 (it waited 5 minutes for a Redis nothing would restart, then blamed
    VIDQ_REDIS_URL, a variable the user never set). The rerun finishes the batch,
    one generation per prompt."""
    env = _sandbox_env(tmp_path)
    prompts = [f"stopped {i}" for i in range(4)]
    path = write_prompts(tmp_path / "night.txt", prompts)
    process = _sandbox_run_until_posted(path, tmp_path, env, 2)
    # C = 2: both POSTs went out together, their ids are recorded within
    # milliseconds, and the next POST waits for a slot (~9 s generations). The
    # kill lands between, not between a POST's answer and its record (then the
    # rerun records the id from the journal: test_paid_journal.py).
    time.sleep(1.0)
    pid = int((tmp_path / "state" / "redis" / "redis-server.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    stopped = time.monotonic()
    output, _ = process.communicate(timeout=60)

    assert process.returncode == 2, output
    assert time.monotonic() - stopped < 30
    assert "this run's Redis stopped (exit status -9;" in output and "redis.log" in output
    assert "resume with: vidq run" in output and "cannot use Redis (VIDQ_REDIS_URL)" not in output
    rerun = _run(path, tmp_path, env, "--sandbox")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert _journal(tmp_path) == Counter({p: 1 for p in prompts})


@pytest.mark.slow
def test_a_run_whose_redis_dies_as_a_post_is_answered_loses_no_video(tmp_path):
    """The run's Redis is killed the moment the sandbox creates the first
    generation: its answer reaches a worker that cannot record it, and the
    stopping run kills that worker (CI met this: the rerun ended the job
    "outcome unknown", its video never downloaded). The rerun's workers
    record the id from the journal in the state directory: every prompt
    done, one generation each."""
    env = _sandbox_env(tmp_path)
    prompts = [f"answered {i}" for i in range(3)]
    path = write_prompts(tmp_path / "night.txt", prompts)
    process = _sandbox_run_until_posted(path, tmp_path, env, 1, every_s=0.002)
    pid = int((tmp_path / "state" / "redis" / "redis-server.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    # Its workers get the POST deadline and the late-answer wait to stop
    # (review 135): ~65 s here, where they cannot reach Redis.
    output, _ = process.communicate(timeout=200)
    assert process.returncode == 2, output

    rerun = _run(path, tmp_path, env, "--sandbox")

    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert _journal(tmp_path) == Counter({p: 1 for p in prompts})
    assert len(list((tmp_path / "videos" / "night").glob("*.mp4"))) == 3


def _sandbox_env(tmp_path) -> dict:
    env = dict(os.environ)
    for name in ("VIDQ_REDIS_URL", "AIML_API_KEY", "AIMLAPI_KEY", "AIMLAPI_BASE_URL",
                 "VIDQ_ENDPOINT"):
        env.pop(name, None)
    env.update(FAST_WORKER_ENV)
    env.update({"VIDQ_STORAGE_URL": (tmp_path / "videos").as_uri(), "VIDQ_MAX_IN_FLIGHT": "2"})
    return env


def test_a_sandbox_run_refuses_to_join_a_deployments_redis(tmp_path, redis_url):
    """With VIDQ_REDIS_URL set, `--sandbox`'s workers and throwaway upstream
    would join that deployment: its workers would POST the trial's prompts to
    the real API, and the trial's workers its jobs to the sandbox. Refused
    before anything starts; so is a run with no API key."""
    path = write_prompts(tmp_path / "night.txt", ["a trial"])
    env = {**_sandbox_env(tmp_path), "VIDQ_REDIS_URL": redis_url}
    joined = _run(path, tmp_path, env, "--sandbox")
    keyless = _run(path, tmp_path, _sandbox_env(tmp_path))

    assert joined.returncode == 2 and "Unset VIDQ_REDIS_URL" in joined.stderr, joined.stderr
    assert keyless.returncode == 2 and "no API key" in keyless.stderr, keyless.stderr
    assert not (tmp_path / "state").exists()  # no private Redis, sandbox or worker started
    assert not redis.Redis.from_url(redis_url).exists(keys.batch("night"))


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_stops_the_run_and_everything_it_started(make_sandbox, tmp_path, stop):
    """`timeout 8h vidq run ...` ends with a SIGTERM, a closed terminal with a
    SIGHUP: the run reports and stops its private Redis and workers, as on
    Ctrl-C. They run in sessions of their own and went on working the batch
    after the run was gone."""
    sandbox = make_sandbox(time_scale=15)
    env = _env(sandbox, tmp_path)
    path = write_prompts(tmp_path / "night.txt", [f"terminated {i}" for i in range(4)])
    process = _start_run_until_posted(path, tmp_path, env, sandbox, posted=1)
    started = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(stop)
    output, _ = process.communicate(timeout=60)

    assert process.returncode == 128 + stop and "resume with: vidq run" in output, output
    assert started and not [p for p in started if p.is_running()
                            and p.status() != psutil.STATUS_ZOMBIE], started


def test_a_finished_runs_paid_failures_are_fetched_by_the_same_command_with_retry(
        make_sandbox, tmp_path):
    """Two jobs fail at the hard limit while their generations still run
    (paid), a third fails upstream (REJECT): the run exits 1, and its Redis
    stops with it, so `vidq retry` had nothing to reach and the videos were
    lost (helper 107). The same command with --retry polls them again: both
    videos stored, nothing POSTed again, and no --retry is offered for the
    upstream's own failure, which a retry finds again (helper 108)."""
    sandbox = make_sandbox(time_scale=1, mean_generation_s=8, spread=0)
    env = _env(sandbox, tmp_path)
    prompts = ["a slow paid fox", "a slow paid owl", "REJECT a refused one"]
    path = write_prompts(tmp_path / "night.txt", prompts)
    first = _run(path, tmp_path, _hurried(env))
    assert first.returncode == 1 and "0 done, 3 failed" in first.stdout, first.stdout
    assert f"retry them with: vidq run --retry {path} --state-dir {tmp_path / 'state'}" in (
        first.stdout), first.stdout

    retried = _run(path, tmp_path, env, "--retry")

    assert retried.returncode == 1, retried.stdout + retried.stderr
    assert "batch night: 3 failed jobs requeued" in retried.stdout, retried.stdout
    assert "2 done, 1 failed" in retried.stdout and "retry them with" not in retried.stdout
    assert _ledger(sandbox) == Counter({prompt: 1 for prompt in prompts})
    assert len(list((tmp_path / "videos" / "night").glob("*.mp4"))) == 2


@pytest.mark.slow
def test_a_finished_runs_unknown_posts_are_posted_again_only_when_asked(make_sandbox,
                                                                         tmp_path):
    """Two POSTs answered 500 end `outcome_unknown` (they may have been
    charged). The run's output named `--resubmit`, which `vidq run` lacks,
    and its Redis stopped with it: no command could POST them again (helper
    108). --retry alone leaves them, saying which flag would; the printed
    command POSTs each once more, and every video is stored."""
    sandbox = make_sandbox(time_scale=15)
    env = _env(sandbox, tmp_path)
    prompts = ["an unknown heron", "an unknown crane", "a known stork"]
    path = write_prompts(tmp_path / "night.txt", prompts)
    requests.post(sandbox.url + "/__faults", json={"submit": [500, 500]},
                  timeout=10).raise_for_status()
    first = _run(path, tmp_path, env)
    assert first.returncode == 1 and "1 done, 2 failed" in first.stdout, first.stdout
    command = (f"vidq run --retry --resubmit-unknown --yes {path} --state-dir "
               f"{tmp_path / 'state'}")
    assert f"charged already) with: {command}\n" in first.stdout, first.stdout
    assert "retry them with" not in first.stdout

    plain = _run(path, tmp_path, env, "--retry")
    assert plain.returncode == 1
    assert "2 jobs left failed" in plain.stdout and "add --resubmit-unknown" in plain.stdout

    posted = subprocess.run(command.split(), env=env, capture_output=True, text=True,
                            timeout=180, cwd=tmp_path)
    assert posted.returncode == 0, posted.stdout + posted.stderr
    assert "2 jobs of batch night will be POSTed again" in posted.stderr, posted.stderr
    assert _ledger(sandbox) == Counter({prompt: 1 for prompt in prompts})  # 500s: nothing
    assert len(list((tmp_path / "videos" / "night").glob("*.mp4"))) == 3


def _hurried(env: dict, generation_s: float = 8, hard_limit_s: float = 4) -> dict:
    """A hard limit (4 s) under the generation time (8 s): the job fails while
    its generation runs, paid."""
    return {**env, "VIDQ_EXPECTED_GENERATION_S": f"{generation_s:g}",
            "VIDQ_DEADLINE_S": f"{hard_limit_s / 2:g}", "VIDQ_HARD_LIMIT_S": f"{hard_limit_s:g}",
            "VIDQ_OVERDUE_POLL_INTERVAL_S": "0.5"}


def test_a_cancelled_runs_paid_generation_is_still_fetched_on_resume(make_sandbox, tmp_path):
    """`vidq cancel` in a second shell while a job's generation runs; that job
    then fails at the hard limit, paid. The printed `--retry` command (and a
    plain resume) refused the cancelled batch at its enqueue, and the paid
    video was lost (helper 108). A cancelled batch now takes no new job, and
    its paid generation is polled and downloaded."""
    from producer.redis_server import running_url

    # The cancel must land before the first job's hard limit frees its slot for
    # the next POST: 12 s of 20 leaves room for a `vidq` start on a loaded machine
    # (_hurried's 4 s did not, beside three busy loops).
    sandbox = make_sandbox(time_scale=1, mean_generation_s=20, spread=0)
    env = {**_env(sandbox, tmp_path), "VIDQ_MAX_IN_FLIGHT": "1"}
    path = write_prompts(tmp_path / "night.txt", ["a paid fox", "never sent", "nor this"])
    process = _start_run_until_posted(path, tmp_path, _hurried(env, 20, 12), sandbox, posted=1)
    private = {**env, "VIDQ_REDIS_URL": running_url(tmp_path / "state" / "redis")}
    cancelled = subprocess.run(["vidq", "cancel", "night"], env=private, capture_output=True,
                               text=True, timeout=60)
    assert cancelled.returncode == 0, cancelled.stderr
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 1 and "generation id kept" in output, output
    assert "--retry" in output, output

    retried = _run(path, tmp_path, env, "--retry")

    assert "batch night was cancelled: nothing new enqueued" in retried.stdout, retried.stdout
    assert "1 done, 0 failed, 2 cancelled" in retried.stdout, retried.stdout
    assert _ledger(sandbox) == Counter({"a paid fox": 1})
    assert len(list((tmp_path / "videos" / "night").glob("*.mp4"))) == 1


def test_a_sigterm_while_the_run_starts_stops_its_redis(make_sandbox, tmp_path):
    """A SIGTERM right as the run's private Redis starts: the run ended
    "Aborted!" with exit 1 and left that redis-server running in its own
    session, 6 times in 6 (helper 108). It now stops it, exits 143 and
    prints the command that resumes."""
    sandbox = make_sandbox()
    path = write_prompts(tmp_path / "night.txt", ["stopped at start"])
    process = _start_run(path, tmp_path, _env(sandbox, tmp_path))
    pid_file = tmp_path / "state" / "redis" / "redis-server.pid"
    pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), 60,
                         "the private Redis started", 0.005))
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)

    assert process.returncode == 143 and "resume with: vidq run" in output, output
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_run_under_nohup_outlives_its_terminal(make_sandbox, tmp_path):
    """`nohup vidq run ... &`, then the terminal closes (SIGHUP): the run
    replaced nohup's "ignore SIGHUP" with its own stop, and the night's batch
    stopped with the SSH session (helper 107). It now keeps what it was
    given: the batch finishes, every video stored, exit 0."""
    sandbox = make_sandbox(time_scale=15)
    env = _env(sandbox, tmp_path)
    prompts = [f"nohup {i}" for i in range(4)]
    path = write_prompts(tmp_path / "night.txt", prompts)
    process = _start_run_until_posted(path, tmp_path, env, sandbox, posted=1, prefix=("nohup",))
    process.send_signal(signal.SIGHUP)
    output, _ = process.communicate(timeout=120)

    assert process.returncode == 0, output
    assert _ledger(sandbox) == Counter({prompt: 1 for prompt in prompts})
    assert len(list((tmp_path / "videos" / "night").glob("*.mp4"))) == 4


@pytest.mark.slow
def test_a_run_whose_output_reader_dies_finishes_the_batch(make_sandbox, tmp_path):
    """`nohup vidq run f | tee log &`, then the terminal closes: tee dies with
    it, and the run's next line met a broken pipe. rich then exits 1 at once:
    the run ended with nothing said, its manifest unwritten (helper 108);
    mid-batch (a progress line every 30 s), with its workers stopped. It now
    goes on without its output: every video stored, the manifest written,
    exit 0. Three 12 s generations in a row outlast the first 30 s."""
    sandbox = make_sandbox(time_scale=1, mean_generation_s=12, spread=0)
    env = {**_env(sandbox, tmp_path), "VIDQ_MAX_IN_FLIGHT": "1"}
    prompts = [f"reader gone {i}" for i in range(3)]
    path = write_prompts(tmp_path / "night.txt", prompts)
    process = _start_run_until_posted(path, tmp_path, env, sandbox, posted=1)
    process.stdout.close()  # the reader (tee) is gone: the run's next write fails
    assert process.wait(timeout=120) == 0
    assert _ledger(sandbox) == Counter({prompt: 1 for prompt in prompts})
    assert len(list((tmp_path / "videos" / "night").glob("*.mp4"))) == 3
    manifest = (tmp_path / "videos" / "night" / "manifest.jsonl").read_text().splitlines()
    assert sorted(json.loads(row)["prompt"] for row in manifest) == sorted(prompts)


@pytest.mark.slow
def test_a_run_killed_outright_stops_what_it_started_and_the_rerun_finishes(make_sandbox,
                                                                            tmp_path):
    """`kill -9` (or the OOM killer) on `vidq run`: its Redis and workers, in
    sessions of their own, went on working the batch with nobody watching,
    and the same command was refused until they were found and stopped by
    hand. The workers stop with it now, and the same command stops the Redis
    nobody uses any more and resumes the batch: one generation per prompt,
    every video stored."""
    sandbox = make_sandbox(time_scale=15)
    env = _env(sandbox, tmp_path)
    prompts = [f"killed outright {i}" for i in range(4)]
    path = write_prompts(tmp_path / "night.txt", prompts)
    process = _start_run_until_posted(path, tmp_path, env, sandbox, posted=1)
    workers = [p for p in psutil.Process(process.pid).children(recursive=True)
               if "celery" in " ".join(p.cmdline())]
    process.kill()
    process.communicate(timeout=30)

    def gone() -> bool:
        return not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    wait_until(gone, 60, "the run's workers to stop")
    rerun = _run(path, tmp_path, env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "stopped the Redis a killed run left (pid " in rerun.stdout
    assert _ledger(sandbox) == Counter({prompt: 1 for prompt in prompts})
    assert len(list((tmp_path / "videos" / "night").glob("*.mp4"))) == 4


def test_an_unfinished_run_names_no_manifest(make_pipeline, make_sandbox, tmp_path):
    """The workers kept exiting at start-up, so the run ends with its batch
    unfinished: no manifest is written for it, and none may be named."""
    from rich.console import Console

    from producer.progress import batch_status
    from producer.run import summarise

    pipeline = make_pipeline(make_sandbox())
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["a", "b"]), "m")
    out = io.StringIO()

    code = summarise(pipeline.admission, "m", batch_status(pipeline.admission, "m"),
                     pipeline.settings, Console(file=out, width=200))

    assert code == 1 and "m: 0 done, 0 failed of 2" in out.getvalue()
    assert "manifest" not in out.getvalue() and "every job's row" not in out.getvalue()


def test_a_state_dir_still_in_use_is_refused(make_sandbox, tmp_path):
    """A run killed without stopping its Redis and workers (the OOM killer, a
    SIGKILL) left them working the batch. The same command again started a
    second Redis on the same files and a second set of workers, and POSTed
    the prompts the first were still working on again. It is refused, naming
    the Redis and the worker processes to stop (it said "the celery workers
    of that run", to be found by hand), and nothing is sent."""
    from producer.redis_server import PrivateRedis

    sandbox = make_sandbox()
    path = write_prompts(tmp_path / "night.txt", ["left running"])
    with PrivateRedis(tmp_path / "state" / "redis") as orphan:
        log = tmp_path / "orphan-worker.log"
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "worker", "-c", "2",
             "--loglevel", "INFO"], env={**_env(sandbox, tmp_path), "VIDQ_REDIS_URL": orphan.url},
            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_log(log, "ready.", worker)
            again = _run(path, tmp_path, _env(sandbox, tmp_path))
        finally:
            stop_processes([worker])

        assert again.returncode == 2, again.stdout + again.stderr
        assert f"in use by a redis-server still running (pid {orphan.process.pid})" in again.stderr
        assert (f"(1 found). Stop them, `kill {worker.pid}`, then the Redis, "
                f"`kill {orphan.process.pid}`") in again.stderr, again.stderr
    assert _ledger(sandbox) == Counter()
    after = _run(path, tmp_path, _env(sandbox, tmp_path))  # stopped: the run goes on
    assert after.returncode == 0, after.stdout + after.stderr


def test_the_runs_last_line_counts_cancelled_jobs(make_pipeline, make_sandbox, tmp_path):
    """`vidq cancel` from a second shell: the run's last line said
    "10 done, 1 failed of 24", leaving 13 jobs out."""
    from rich.console import Console
    from test_batch_ops import vidq

    from producer.progress import batch_status
    from producer.run import summarise

    pipeline = make_pipeline(make_sandbox())
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["a", "b", "c"]), "m")
    assert vidq(pipeline, "cancel", "m").returncode == 0
    out = io.StringIO()

    code = summarise(pipeline.admission, "m", batch_status(pipeline.admission, "m"),
                     pipeline.settings, Console(file=out, width=200))

    assert code == 1 and "m: 0 done, 0 failed, 3 cancelled of 3" in out.getvalue()
