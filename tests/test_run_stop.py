"""`vidq run` stopped while a POST's answer is on its way (review 135). The
run gave its workers 20 s, then killed them, and Celery's parent-death
signal killed the pool child reading the answer: the generation was paid
and never recorded, the rerun failed the job "outcome unknown", and the
stop's summary called the job "not submitted yet". Stopped by the terminal
closing (SIGHUP, every write then failing with EIO), the first print of the
stop killed the workers after 3 s (review 137). The production POST
deadline (60 s); the answer takes ~30 s."""
from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import termios
import threading
import time

import pytest
import requests
from chaos.faultproxy import FaultProxy
from conftest import write_prompts
from test_run_resume import _env, _ledger, _run


def _own_terminal() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty becomes the run's controlling terminal


def _drain(fd: int, seen: bytearray) -> None:
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            return
        if not chunk:
            return
        seen.extend(chunk)


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["ctrl-c", "terminal closed"])
def test_a_run_stopped_while_a_post_answers_slowly_keeps_its_paid_video(make_sandbox,
                                                                        tmp_path, stop):
    sandbox = make_sandbox()
    proxy = FaultProxy(sandbox.url, seed=3, rewrite_urls=True).start()
    try:
        proxy.trickle_interval_s = 30 / 300  # the ~300-byte answer, a byte at a time
        proxy.queue("trickle", count=1, method="POST")
        env = {**_env(sandbox, tmp_path), "AIMLAPI_BASE_URL": proxy.url,
               "VIDQ_POST_DEADLINE_S": "60", "VIDQ_STEP_GRACE_S": "90"}
        path = write_prompts(tmp_path / "night.txt", ["an answer on its way at the stop"])
        command = ["vidq", "run", str(path), "--state-dir", str(tmp_path / "state")]
        terminal, seen = None, bytearray()
        if stop == "ctrl-c":
            run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
        else:
            terminal, tty = os.openpty()
            run = subprocess.Popen(command, env=env, stdin=tty, stdout=tty,
                                   stderr=open(tmp_path / "stderr.txt", "wb"), cwd=tmp_path,
                                   start_new_session=True, preexec_fn=_own_terminal)
            os.close(tty)
            threading.Thread(target=_drain, args=(terminal, seen), daemon=True).start()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not _ledger(sandbox):
            time.sleep(0.1)
        time.sleep(2)
        if terminal is None:
            run.send_signal(signal.SIGINT)
            out, _ = run.communicate(timeout=200)
            assert run.returncode == 130, out
            assert "1 being POSTed (may be charged), 0 not submitted yet" in out
            assert "stopping the workers: each ends the steps it runs first" in out
        else:
            os.close(terminal)  # SIGHUP to the run; its writes fail from now on
            assert run.wait(timeout=200) == 128 + signal.SIGHUP

        again = _run(path, tmp_path, env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "1 done" in again.stdout and "unknown" not in again.stdout
        (generation,) = requests.get(sandbox.url + "/__ledger", timeout=10).json()
        (video,) = (tmp_path / "videos").rglob("*.mp4")
        assert hashlib.sha256(video.read_bytes()).hexdigest() == generation["sha256"]
    finally:
        proxy.stop()
