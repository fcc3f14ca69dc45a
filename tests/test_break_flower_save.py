"""Flower's forked state save (worker/flower_save.py) when a save child hangs: a child
stopped mid-save (as one blocked on a stalled disk would be) is killed after its time
limit and the next saves go on; Flower told to stop while a child hangs still exits and
writes its final save within its grace period, leaving no child behind; finished
children are reaped (no zombies pile up)."""
from __future__ import annotations

import contextlib
import os
import shelve
import signal
import subprocess
import time
from pathlib import Path

import requests
from conftest import wait_http, write_prompts
from test_flower import AUTH, ROOT, documented_flower_command, start_flower

CONF = """\
# vidq's Flower configuration, with the hung-save limits of this test.
import worker.flowerconfig  # noqa: F401
from worker import flower_save
flower_save.SAVE_TIMEOUT_S = 2.0
flower_save.STOP_WAIT_S = 2.0
"""


def _children(pid: int) -> dict[int, str]:
    """pid -> state letter of every child of `pid` (from /proc/<pid>/task/*/children)."""
    found = {}
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found.update((int(child), "") for child in listing.read_text().split())
        except OSError:
            continue
    return {child: _state(child) for child in found if _state(child)}


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return ""


def _stop_a_save_child(flower: subprocess.Popen, db: Path, timeout_s: float = 20.0) -> int:
    """SIGSTOP a save child of `flower` while it writes `db`'s temporary files (so in
    Flower's own save_state, past the child's set-up); returns its pid."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid, state in _children(flower.pid).items():
            if state in "RSD" and list(db.parent.glob(db.name + ".tmp*")):
                os.kill(pid, signal.SIGSTOP)
                time.sleep(0.05)
                if _state(pid) == "T" and list(db.parent.glob(db.name + ".tmp*")):
                    return pid
                os.kill(pid, signal.SIGCONT)
        time.sleep(0.001)
    raise AssertionError("never caught a save child running")


def _saved_mtime(db: Path) -> int:
    return max((p.stat().st_mtime_ns for p in db.parent.glob(db.name + "*")
                if ".tmp" not in p.name), default=0)


def test_a_hung_save_child_is_killed_and_flower_still_saves_and_stops(make_pipeline, tmp_path):
    pipeline = make_pipeline()
    conf = tmp_path / "flowerconfig.py"
    conf.write_text(CONF)
    db = tmp_path / "flower.db"
    flower, base, log = start_flower(pipeline.env, tmp_path, f"--conf={conf}",
                                     "--state_save_interval=300")
    stopped: list[int] = []
    try:
        pipeline.start_workers()
        pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["one", "two", "three"]), "hang")
        pipeline.wait_finished("hang")
        zombies = []
        for _ in range(20):  # two seconds of saves every 0.3 s: at most the last one unreaped
            zombies.append(sum(1 for s in _children(flower.pid).values() if s == "Z"))
            time.sleep(0.1)
        assert max(zombies) <= 1, f"zombie save children pile up: {zombies}; log {log}"
        seen = set(requests.get(base + "/api/tasks", auth=AUTH, timeout=10).json())

        stopped.append(_stop_a_save_child(flower, db))
        hung_at = time.time_ns()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
                stopped[-1] not in _children(flower.pid) and _saved_mtime(db) > hung_at):
            time.sleep(0.2)
        assert stopped[-1] not in _children(flower.pid), \
            f"the hung save child {stopped[-1]} is still there 10 s later; log {log}"
        assert _saved_mtime(db) > hung_at, f"no save since a child hung; log {log}"

        stopped.append(_stop_a_save_child(flower, db))
        flower.send_signal(signal.SIGTERM)
        try:
            flower.wait(20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"Flower did not exit within 20 s of SIGTERM while a save "
                                 f"child hung; log {log}") from None
    finally:
        for pid in stopped:  # Flower's save children this test stopped, if still stopped
            if _state(pid) == "T":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if flower.poll() is None:
            flower.kill()
            flower.wait(10)
    with shelve.open(str(db), flag="r") as saved:
        on_disk = set(saved["events"].tasks)
    assert len(seen) >= 9 and seen <= on_disk, f"final save lacks tasks; log {log}"
    assert "Traceback" not in log.read_text(errors="replace"), f"see {log}"


def test_a_crashed_flowers_save_child_does_not_keep_its_port(make_pipeline, tmp_path):
    """Flower SIGKILLed while a save child hangs: the child, which inherited Flower's
    listening socket, dies with it, so Flower restarted on the same port starts."""
    pipeline = make_pipeline()
    flower, base, log = start_flower(pipeline.env, tmp_path, "--state_save_interval=300")
    port, child, db = int(base.rsplit(":", 1)[1]), 0, tmp_path / "flower.db"
    try:
        child = _stop_a_save_child(flower, db)
        flower.kill()  # a crash: no stop, no save at exit
        flower.wait(10)
        deadline = time.monotonic() + 10
        while _state(child) not in ("", "Z") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _state(child) in ("", "Z"), \
            f"the save child {child} outlived Flower, holding port {port}; log {log}"
        again = subprocess.Popen(documented_flower_command(port, db),
                                 env=pipeline.env, cwd=ROOT, stdout=open(log, "ab"),
                                 stderr=subprocess.STDOUT)
        try:
            wait_http(base + "/healthcheck", again, log, timeout_s=60)  # a loaded machine
        finally:
            again.terminate()
            again.wait(15)
    finally:
        if child and _state(child) == "T":  # the stopped save child, if it outlived Flower
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        if flower.poll() is None:
            flower.kill()
            flower.wait(10)
