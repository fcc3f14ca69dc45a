"""Every `vidq` subcommand turns bad settings and a bad or unreachable Redis into one
`error:` line on stderr and exit status 2, never a traceback and never a piece of a
password in the URL; `vidq run` derives a
safe batch name from the file name.

Real parts only: the `vidq` command as a subprocess, the test Redis, and for `run`
its own sandbox and worker processes.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import redis
from conftest import write_prompts

from worker.settings import Settings

VIDQ = [sys.executable, "-c", "from producer.cli import main; main()"]
PASSWORD = "Zq7Secr3tPw"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cases(redis_url: str) -> dict[str, tuple[dict, str]]:
    """name -> (environment overrides, a fragment the error line must contain)."""
    return {
        "max_in_flight_0": ({"VIDQ_REDIS_URL": redis_url, "VIDQ_MAX_IN_FLIGHT": "0"},
                            "VIDQ_MAX_IN_FLIGHT"),
        "http_timeout_abc": ({"VIDQ_REDIS_URL": redis_url, "VIDQ_HTTP_TIMEOUT_S": "abc"},
                             "VIDQ_HTTP_TIMEOUT_S"),
        # nan passes every "< 0" check, then broke the first enqueue with a raw Redis error.
        "credit_estimate_nan": ({"VIDQ_REDIS_URL": redis_url, "VIDQ_CREDIT_ESTIMATE": "nan"},
                                "VIDQ_CREDIT_ESTIMATE='nan' is not a finite number"),
        "credit_estimates_inf": ({"VIDQ_REDIS_URL": redis_url, "VIDQ_CREDIT_ESTIMATES":
                                  "alibaba/wan2.1-t2v-turbo@480P=inf"}, "VIDQ_CREDIT_ESTIMATES"),
        # Checked only when a worker first stored a video: every command accepted it.
        "storage_ftp": ({"VIDQ_REDIS_URL": redis_url,
                         "VIDQ_STORAGE_URL": f"ftp://me:{PASSWORD}@host/videos"},
                        "VIDQ_STORAGE_URL='ftp://host/videos': unsupported scheme 'ftp'"),
        "unreachable": ({"VIDQ_REDIS_URL": f"redis://127.0.0.1:{closed_port()}/0"},
                        "VIDQ_REDIS_URL"),
        "notaurl": ({"VIDQ_REDIS_URL": "notaurl"}, "VIDQ_REDIS_URL"),
        "http_url": ({"VIDQ_REDIS_URL": "http://x"}, "VIDQ_REDIS_URL"),
        # redis-py reads a db that is not a number as db 0, silently.
        "db_not_a_number": ({"VIDQ_REDIS_URL": f"redis://127.0.0.1:{closed_port()}/zero"},
                            "VIDQ_REDIS_URL is not a Redis URL"),
        # An unencoded '/' or '#' splits the URL inside the password: the parser's
        # own message quoted its head ("Port could not be cast ... 'Zq7Se'").
        "slash_in_password": ({"VIDQ_REDIS_URL": f"redis://:{PASSWORD[:5]}/{PASSWORD[5:]}"
                                                 f"@127.0.0.1:{closed_port()}/0"},
                              "percent-encode"),
        "hash_in_password": ({"VIDQ_REDIS_URL": f"redis://:{PASSWORD[:5]}#{PASSWORD[5:]}"
                                                f"@127.0.0.1:{closed_port()}/0"},
                             "VIDQ_REDIS_URL"),
        # The query is as secret as the userinfo: messages showed `?password=`
        # (redis-py's own form) and an S3 URL's `?secret=` whole.
        "password_in_query": ({"VIDQ_REDIS_URL": f"redis://127.0.0.1:{closed_port()}/zero"
                                                 f"?password={PASSWORD}"}, "VIDQ_REDIS_URL"),
        "s3_secret_in_query": ({"VIDQ_REDIS_URL": redis_url, "VIDQ_STORAGE_URL":
                                f"s3://bucket/videos?secret={PASSWORD}"},
                               "VIDQ_STORAGE_URL='s3://bucket/videos': use s3://bucket/prefix"),
        # kombu splits the broker URL on ';' (failover), and redis-py's plain
        # Connection takes no ssl_* keyword: both were tracebacks or "<not a URL>".
        "semicolon_in_password": ({"VIDQ_REDIS_URL": f"redis://:{PASSWORD[:5]};{PASSWORD[5:]}"
                                                     f"@127.0.0.1:{closed_port()}/0"}, "%3B"),
        "ssl_option_on_sentinel": ({"VIDQ_REDIS_URL": f"sentinel://127.0.0.1:{closed_port()}"
                                                      "?ssl_cert_reqs=required&master_name=m"},
                                   "ssl_* options need TLS: use rediss://"),
        "trailing_semicolon": ({"VIDQ_REDIS_URL": f"redis://127.0.0.1:{closed_port()}/0;"},
                               "nothing after a ';'"),
        "ssl_option_without_tls": ({"VIDQ_REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:"
                                                      f"{closed_port()}/0?ssl_cert_reqs=required"},
                                   "ssl_* options need TLS: use rediss://"),
        "sentinel_then_plain": ({"VIDQ_REDIS_URL": f"sentinel://:{PASSWORD}@127.0.0.1:26379;"
                                                   f"redis://:{PASSWORD}@h2:6379"},
                                "every ;-separated part"),
    }


def base_env() -> dict:
    env = dict(os.environ)
    for name in ("VIDQ_REDIS_URL", "VIDQ_MAX_IN_FLIGHT", "VIDQ_HTTP_TIMEOUT_S", "AIMLAPI_KEY",
                 "AIML_API_KEY", "VIDQ_STORAGE_URL"):
        env.pop(name, None)
    return env


COMMANDS = {
    "enqueue": ["enqueue", "{file}", "--batch", "b"],
    "status": ["status", "b"],
    "retry": ["retry", "b"],
    "cap": ["cap"],
    "run": ["run", "{file}", "--sandbox", "--state-dir", "{state}"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_settings_and_redis_give_one_error_line(command, redis_url, tmp_path):
    """Each case: exit 2, stderr is exactly one line starting 'error:' naming the
    culprit, no traceback, nothing written to Redis, nothing started by `run`."""
    assert_refused(command, cases(redis_url), redis_url, tmp_path)


def refused_settings(redis_url: str) -> dict[str, tuple[dict, str]]:
    """Values each setting took and then hung, spun or failed every job at night
    with: 0 or negative (a 0 HTTP timeout failed every POST before it was sent,
    yet each job ended "outcome unknown", its credits counted), an unusable key."""
    counts = {"VIDQ_MAX_ATTEMPTS": "0", "VIDQ_MAX_VIDEO_BYTES": "0"}
    durations = {"VIDQ_HTTP_TIMEOUT_S": "0", "VIDQ_EXPECTED_GENERATION_S": "-5",
                 "VIDQ_POLL_MIN_INTERVAL_S": "-1", "VIDQ_HEARTBEAT_INTERVAL_S": "0",
                 "VIDQ_RECONCILE_INTERVAL_S": "0", "VIDQ_DEADLINE_S": "-1",
                 "VIDQ_WEBHOOK_TIMEOUT_S": "0", "VIDQ_POST_DEADLINE_S": "-100"}
    found = {name: ({"VIDQ_REDIS_URL": redis_url, name: value},
                    f"{name}={value}: must be at least 1") for name, value in counts.items()}
    found.update({name: ({"VIDQ_REDIS_URL": redis_url, name: value},
                         f"{name}={value}: must be above 0") for name, value in durations.items()})
    found["poll_min_over_max"] = (
        {"VIDQ_REDIS_URL": redis_url, "VIDQ_POLL_MIN_INTERVAL_S": "700"},
        "VIDQ_POLL_MIN_INTERVAL_S=700 is above VIDQ_POLL_MAX_INTERVAL_S=600")
    # A key no HTTP header can carry failed every POST unsent, each job then
    # "outcome unknown". The message places the character, never shows the key.
    for name, key, kind in (("key_line_break", f"{PASSWORD}\nX", "a control character"),
                            ("key_en_dash", f"{PASSWORD}\u2013X", "not ASCII")):
        found[name] = ({"VIDQ_REDIS_URL": redis_url, "AIMLAPI_KEY": key},
                       f"AIMLAPI_KEY (or AIML_API_KEY): character 12 of the key is {kind}")
    # Malformed URLs: urlsplit's ValueError was a traceback, a bad port or host
    # was taken and failed at the first video stored, webhook sent or POST.
    unusable = "is not a usable URL: "
    for name, variable, url, fragment in (
            ("storage_bracket", "VIDQ_STORAGE_URL", "s3://[bucket/p",
             "VIDQ_STORAGE_URL='s3://[bucket/p' is malformed"),
            ("storage_port", "VIDQ_STORAGE_URL", "s3://bucket:99999/p",
             "VIDQ_STORAGE_URL='s3://bucket:99999/p': use s3://bucket/prefix (a bucket name"),
            ("storage_space", "VIDQ_STORAGE_URL", "s3://my bucket/p",
             "VIDQ_STORAGE_URL='s3://my bucket/p': use s3://bucket/prefix (a bucket name"),
            ("webhook_bracket", "VIDQ_WEBHOOK_URL", f"https://[::1/hook?token={PASSWORD}",
             f"VIDQ_WEBHOOK_URL: '<unparseable URL>' {unusable}malformed"),
            ("webhook_port", "VIDQ_WEBHOOK_URL", f"https://example.com:99999/h?t={PASSWORD}",
             f"VIDQ_WEBHOOK_URL: 'https://example.com:99999/h' {unusable}malformed"),
            ("webhook_space", "VIDQ_WEBHOOK_URL", f"https://exa mple.com/h?t={PASSWORD}",
             f"VIDQ_WEBHOOK_URL: 'https://exa mple.com/h' {unusable}its host holds"),
            ("base_bracket", "AIMLAPI_BASE_URL", f"https://me:{PASSWORD}@[api/",
             f"AIMLAPI_BASE_URL='<unparseable URL>' {unusable}malformed"),
            ("base_not_a_url", "AIMLAPI_BASE_URL", "api.example.com",
             f"AIMLAPI_BASE_URL='<not a URL>' {unusable}no host")):
        found[name] = ({"VIDQ_REDIS_URL": redis_url, variable: url}, fragment)
    return found


def test_a_malformed_webhook_option_is_refused_naming_it(redis_url, tmp_path):
    """`vidq enqueue --webhook URL`: the same checks, naming the option; nothing written."""
    prompts = write_prompts(tmp_path / "p.txt", ["a small red boat"])
    for url in (f"https://[::1/hook?token={PASSWORD}", f"https://example.com:99999/h?t={PASSWORD}",
                f"https://exa mple.com/h?t={PASSWORD}"):
        result = subprocess.run(VIDQ + ["enqueue", str(prompts), "--batch", "b", "--webhook", url],
                                env={**base_env(), "VIDQ_REDIS_URL": redis_url}, cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        where = f"--webhook {url!r}: {result}"
        assert result.returncode == 2, where
        assert result.stderr.startswith("error: --webhook: ") and "not a usable URL" in \
            result.stderr and len(result.stderr.splitlines()) == 1, where
        assert PASSWORD not in result.stdout + result.stderr, where
    assert redis.Redis.from_url(redis_url).dbsize() == 0


@pytest.mark.parametrize("command", ["enqueue", "run"])
def test_bad_values_are_refused_naming_the_variable(command, redis_url, tmp_path):
    assert_refused(command, refused_settings(redis_url), redis_url, tmp_path)


def test_the_settings_whose_zero_means_something_keep_it():
    """0: POSTs unpaced, a finished batch leaves Redis at once, a failing webhook is not retried."""
    settings = Settings.from_env({"VIDQ_MAX_SUBMITS_PER_S": "0", "VIDQ_RETENTION_S": "0",
                                  "VIDQ_WEBHOOK_RETRY_FOR_S": "0"})
    assert (settings.max_submits_per_s, settings.retention_s,
            settings.webhook_retry_for_s) == (0, 0, 0)


def assert_refused(command: str, refused: dict[str, tuple[dict, str]], redis_url: str,
                   tmp_path) -> None:
    """Each case run at once as `vidq COMMAND` (see the test above for what is asserted)."""
    prompts = write_prompts(tmp_path / "p.txt", ["a small red boat"])
    running = {}
    for name, (overrides, fragment) in refused.items():
        state = tmp_path / f"state-{name}"
        args = [a.format(file=prompts, state=state) for a in COMMANDS[command]]
        running[name] = (subprocess.Popen(
            VIDQ + args, env={**base_env(), **overrides}, cwd=tmp_path, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE), fragment, state)

    for name, (process, fragment, state) in running.items():
        stdout, stderr = process.communicate(timeout=60)
        where = f"vidq {command} [{name}]: stdout={stdout!r} stderr={stderr!r}"
        assert process.returncode == 2, where
        assert "Traceback" not in stderr, where
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), where
        assert fragment in lines[0], where
        assert PASSWORD[:5] not in stdout + stderr and PASSWORD[5:] not in stdout + stderr, where
        if command == "run":  # refused before a private Redis, sandbox or worker started
            assert not state.exists(), where
    assert redis.Redis.from_url(redis_url).dbsize() == 0
    assert not (tmp_path / "videos").exists() and not (tmp_path / ".vidq").exists()


def test_a_password_in_the_redis_urls_query_is_refused_before_anything_is_written(
        restartable_redis, tmp_path):
    """`?password=` is redis-py's own form, but Celery's broker (kombu) cannot
    read it: `vidq enqueue` wrote the jobs and took their slots, then died
    sending their tasks (TypeError: multiple values for 'password'). Refused
    first, saying where the password goes; the password is never shown."""
    redis.Redis.from_url(restartable_redis.url).config_set("requirepass", PASSWORD)
    prompts = write_prompts(tmp_path / "p.txt", ["a small red boat", "a tall green tree"])
    result = subprocess.run(VIDQ + ["enqueue", str(prompts), "--batch", "b"],
                            env={**base_env(), "VIDQ_REDIS_URL":
                                 f"{restartable_redis.url}?password={PASSWORD}"},
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)

    assert result.returncode == 2, result
    assert result.stderr.startswith("error: VIDQ_REDIS_URL: put the password in the URL's "
                                     "userinfo, redis://:PASSWORD@host:port/0"), result.stderr
    assert len(result.stderr.splitlines()) == 1 and PASSWORD not in result.stderr
    assert redis.Redis.from_url(restartable_redis.url, password=PASSWORD).dbsize() == 0


@pytest.mark.parametrize("option, value", [("--workers", "0"), ("--workers", "-2"),
                                           ("--concurrency", "0"), ("--concurrency", "-1")])
def test_run_refuses_no_workers_or_no_pool_before_starting_anything(option, value, tmp_path):
    """`vidq run --workers 0` (or --concurrency 0) started its Redis and sandbox,
    then waited for ever with no worker to do the batch."""
    prompts = write_prompts(tmp_path / "p.txt", ["a small red boat"])
    state = tmp_path / "state"
    process = subprocess.Popen(VIDQ + ["run", str(prompts), "--sandbox", "--state-dir",
                                       str(state), option, value],
                               env=base_env(), cwd=tmp_path, text=True, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"vidq run {option} {value} still running after 30 s: {stdout} {stderr}")
    assert process.returncode == 2, (stdout, stderr)
    assert f"Invalid value for '{option}': {value} is not in the range x>=1" in stderr
    assert "Traceback" not in stderr and not state.exists()


def test_help_works_with_bad_settings():
    """Help never reads the settings: it works while they are broken."""
    env = {**base_env(), "VIDQ_MAX_IN_FLIGHT": "0", "VIDQ_REDIS_URL": "notaurl"}
    for args in (["--help"], ["run", "--help"]):
        result = subprocess.run(VIDQ + args, env=env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, (args, result.stderr)
        assert "Usage:" in result.stdout and result.stderr == "", (args, result.stderr)


def test_run_derives_a_safe_batch_name_from_the_file_name(redis_url, make_sandbox, tmp_path):
    """`vidq run .x.txt` and `vidq run -- -y.txt` name their batches 'x' and 'y';
    `-.txt` falls back to 'batch'. Each run is interrupted once its batch exists."""
    files = {".x.txt": "x", "-y.txt": "y", "-.txt": "batch"}
    sandbox = make_sandbox()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    runs = []
    for index, (name, _) in enumerate(files.items()):
        write_prompts(tmp_path / name, [f"a lantern on a pier number {index}"])
        runs.append(subprocess.Popen(
            VIDQ + ["run", "--state-dir", str(tmp_path / f"state{index}"), "--", name],
            env={**base_env(), "VIDQ_REDIS_URL": redis_url, "AIMLAPI_BASE_URL": sandbox.url,
                 "AIMLAPI_KEY": sandbox.config.api_key}, cwd=tmp_path, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        deadline = time.monotonic() + 45
        while len(client.smembers("vidq:batches")) < len(files):
            assert time.monotonic() < deadline, client.smembers("vidq:batches")
            assert all(run.poll() is None for run in runs), [r.communicate() for r in runs]
            time.sleep(0.1)
    finally:
        for run in runs:
            if run.poll() is None:
                run.send_signal(signal.SIGINT)
        outputs = [run.communicate(timeout=60) for run in runs]

    assert client.smembers("vidq:batches") == set(files.values())
    assert not [key for key in client.scan_iter() if key.startswith(("vidq:batch:.",
                                                                     "vidq:batch:-"))]
    for run, (stdout, stderr) in zip(runs, outputs, strict=True):
        assert "Traceback" not in stderr, stderr
        assert run.returncode in (0, 130), (run.returncode, stdout, stderr)


@pytest.mark.parametrize("setting, said", [
    ({"VIDQ_POST_DEADLINE_S": "8", "VIDQ_STEP_GRACE_S": "10"},
     "error: VIDQ_STEP_GRACE_S must exceed VIDQ_POST_DEADLINE_S"),
    # A '/' in compose's password: kombu's traceback blamed a "port" (review 142).
    ({"VIDQ_REDIS_URL": "redis://:abc/def+gh=@127.0.0.1:6399/0"},
     "error: VIDQ_REDIS_URL: no host:port where one must be: a '/', '#', '?', '[' or ']' in "
     "the password ends or breaks the address there"),
    ({"VIDQ_REDIS_URL": "redis://127.0.0.1:70000/0"},
     "error: VIDQ_REDIS_URL: its port is out of range (1-65535)")])
def test_a_worker_with_a_bad_setting_says_which(redis_url, setting, said):
    """A worker started with VIDQ_STEP_GRACE_S too short for the POST deadline
    exits naming it; it used to die of "'Celery' object has no attribute
    'vidq_settings'", the real cause nowhere in its output, and then after
    Celery's banner (showing its default amqp:// transport, as if that were
    the problem) and a traceback (helper 107). Now: one line, exit 2."""
    env = {**base_env(), "VIDQ_REDIS_URL": redis_url, "AIMLAPI_KEY": "sk-test", **setting}
    worker = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "worker", "-c", "1",
                             "--without-mingle", "--without-gossip"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert worker.returncode == 2, worker.stdout + worker.stderr
    assert worker.stderr.startswith(said), worker.stderr
    assert worker.stderr.count("\n") == 1 and worker.stdout == "", worker.stdout + worker.stderr
    assert "def+gh" not in worker.stderr  # no piece of the password shown


def test_a_worker_whose_clock_is_off_says_so(make_pipeline):
    """A worker an hour ahead of Redis (faketime) logs an error at start: its
    countdown polls would run an hour off and be re-sent, slowing the batch
    with nothing said (review 14 measured 45-60% longer)."""
    pipeline = make_pipeline()
    log_path = pipeline.log_dir / "skewed.log"
    env = {**pipeline.env, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    with log_path.open("w") as log:
        worker = subprocess.Popen(
            ["faketime", "-f", "+3600s", sys.executable, "-m", "celery", "-A", "worker",
             "worker", "-c", "1", "-n", "skewed@%h", "--without-mingle", "--without-gossip"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "off Redis's" not in log_path.read_text():
            assert worker.poll() is None, log_path.read_text()
            time.sleep(0.2)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    assert "this machine's clock is +3600 s off Redis's" in log_path.read_text()


def test_a_clock_that_jumps_mid_night_is_told_once_each_way(caplog):
    """Checked with every heartbeat (the worker above shows the wiring): a clock
    that jumps an hour after start (an NTP step, a VM moved) is an error once,
    not once a beat, and its return is told too."""
    from worker.deployment import note_clock_skew

    off = False
    with caplog.at_level("WARNING", logger="worker.deployment"):
        for skew in (0.2, 3600.4, 3600.1, -0.3, 0.1):
            off = note_clock_skew(skew, off)
    said = [record.getMessage() for record in caplog.records]

    assert said == ["this machine's clock is +3600 s off Redis's: countdown polls run on each "
                    "worker's clock, so they come late or early and are re-sent; sync the "
                    "clocks (NTP)", "this machine's clock agrees with Redis's again (-0.3 s)"]
    assert off is False


def test_a_clock_a_few_seconds_off_is_told():
    """4 s off delays every poll crossing to another worker by 4 s (review 93:
    7x the idle slot-seconds), and went unsaid under the old 5 s threshold."""
    from worker.deployment import note_clock_skew

    assert note_clock_skew(-4.0, False) is True and note_clock_skew(0.3, False) is False



def test_a_redis_that_refuses_the_login_is_an_error_not_a_reason_to_read_the_manifest(
        restartable_redis, tmp_path):
    """With no Redis to reach, `report` and `status` read a batch's manifest.
    A Redis refusing the password holds the live batch: answering from an
    older run's manifest of that name showed finished rows with exit 0."""
    redis.Redis.from_url(restartable_redis.url).config_set("requirepass", PASSWORD)
    videos = tmp_path / "videos"
    (videos / "night").mkdir(parents=True)
    (videos / "night" / "manifest.jsonl").write_text(
        json.dumps({"custom_id": "old", "state": "done"}) + "\n")
    port = restartable_redis.url.rsplit(":", 1)[1].split("/")[0]
    env = {**base_env(), "VIDQ_STORAGE_URL": videos.as_uri()}
    for url in (f"redis://:wrong-{PASSWORD}@127.0.0.1:{port}/0",
                f"redis://127.0.0.1:{closed_port()}/0"):
        for command in (["report", "night"], ["status", "night"]):
            result = subprocess.run(VIDQ + command, env={**env, "VIDQ_REDIS_URL": url},
                                    cwd=tmp_path, capture_output=True, text=True, timeout=60)
            if "wrong" in url:
                assert result.returncode == 2 and "error: cannot use Redis" in result.stderr
                assert "old" not in result.stdout and PASSWORD not in result.stderr
            else:  # nothing listening: the manifest is what is left
                assert result.returncode == 0, result.stderr
                assert "read from its manifest" in result.stderr


def test_a_sentinel_without_a_master_is_one_readable_line():
    """No Sentinel answered: redis-py's error held the repr of every connection
    pool tried, over 1,000 characters on the one error line (review 90)."""
    from redis.sentinel import MasterNotFoundError

    from producer.redis_unusable import redis_error_text

    pools = "<redis.client.Redis(<redis.connection.ConnectionPool(" + "x" * 1200 + ")>)>"
    text = redis_error_text(MasterNotFoundError(f"No master found for 'mymaster' : {pools}"))
    assert text == ("cannot use Redis (VIDQ_REDIS_URL): MasterNotFoundError: No master found "
                    "for 'mymaster' (are the Sentinels up, and is the master's name right?)")


def test_a_damaged_manifest_is_one_error_line_and_odd_rows_still_count(tmp_path):
    """Status read from a manifest (no Redis listens): a row with a text
    credits figure or no state, and a line that is not a row, were tracebacks
    (review 96)."""
    import json

    manifest = tmp_path / "videos" / "night" / "manifest.jsonl"
    manifest.parent.mkdir(parents=True)
    rows = [{"custom_id": "a", "state": "done", "credits": "120000"},
            {"custom_id": "b", "state": None, "credits": None}]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = {**base_env(), "VIDQ_REDIS_URL": f"redis://127.0.0.1:{closed_port()}/0",
           "VIDQ_STORAGE_URL": (tmp_path / "videos").as_uri()}

    def status(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["vidq", "status", "night", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    read = json.loads(status("--json").stdout)
    assert read["counts"] == {"done": 1, "unknown": 1} and read["credits"]["spent"] == 120000
    assert "1 done, 1 unknown" in status().stdout
    manifest.write_text(manifest.read_text() + "[1, 2]\n")
    damaged = status()
    assert damaged.returncode == 2 and "Traceback" not in damaged.stderr
    assert "line 3 is not a manifest row (not a JSON object)" in damaged.stderr


@pytest.mark.parametrize("query, wanted", [("", "CERT_REQUIRED"), ("?ssl_ca_certs=/ca.pem",
                                                                     "CERT_REQUIRED"),
                                           ("?ssl_cert_reqs=none", "CERT_NONE")])
def test_a_tls_redis_urls_broker_checks_the_certificate_unless_told_not_to(query, wanted):
    """kombu's default for rediss:// without ssl_cert_reqs is CERT_NONE (it
    logs "insecure SSL"): the broker's connection, carrying the password and
    every task, took any certificate while redis-py, on the same URL, checked
    it (review 142). Now the broker checks it too, unless the URL says none."""
    env = {**base_env(), "AIMLAPI_KEY": "sk-test",
           "VIDQ_REDIS_URL": f"rediss://:{PASSWORD}@redis.internal:6380/0{query}"}
    broker = subprocess.run(  # a process of its own: the app's settings are global
        [sys.executable, "-c", "from worker.celery_app import app; "
                               "print(app.connection_for_write().ssl['ssl_cert_reqs'].name)"],
        env=env, capture_output=True, text=True, timeout=60)
    assert broker.stdout.strip() == wanted, broker.stderr
