"""Flower, started with the flags docker-compose.yml documents, sees vidq's tasks through
Celery events (no prompt, no key in them), and its Broker page counts the jobs waiting for
an upstream slot, per batch, though no Celery queue holds them."""
from __future__ import annotations

import shelve
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml
from conftest import wait_http, wait_until, write_prompts

from producer.redis_server import free_port
from worker import keys
from worker.celery_app import QUEUES
from worker.flower_backlog import ROW_PREFIX, TOTAL_ROW

ROOT = Path(__file__).resolve().parents[1]
AUTH = ("ops", "night-shift")


def documented_flower_command(port: int, db: Path) -> list[str]:
    """docker-compose.yml's Flower command (the README's flags), bound to this machine."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    local = {"--address": "127.0.0.1", "--port": str(port), "--db": str(db)}
    command = []
    for arg in compose["services"]["flower"]["command"]:
        name = arg.split("=", 1)[0]
        command.append(f"{name}={local[name]}" if name in local else arg)
    return [sys.executable, "-m", *command, f"--basic-auth={AUTH[0]}:{AUTH[1]}"]


def start_flower(env: dict, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, str, Path]:
    """Flower as documented (plus `extra` flags, which win), answering; returns (process,
    base URL, log path)."""
    port, log = free_port(), tmp_path / "flower.log"
    flower = subprocess.Popen([*documented_flower_command(port, tmp_path / "flower.db"), *extra],
                              env=env, cwd=ROOT, stdout=open(log, "ab"),
                              stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/healthcheck", flower, log)
    except AssertionError:
        flower.terminate()
        raise
    return flower, base, log


def stop_flower(flower: subprocess.Popen) -> None:
    flower.terminate()
    flower.wait(15)


def test_flower_shows_each_step_without_prompts_or_key(make_pipeline, tmp_path):
    """Flower's task list has submit, poll and download; args are refs and tokens only."""
    pipeline = make_pipeline()
    flower, base, _ = start_flower(pipeline.env, tmp_path)
    try:
        pipeline.start_workers()
        pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["a secret garden at noon",
                                                           "REJECT this one"]), "fl")
        assert pipeline.wait_finished("fl")["done"] == 1

        def all_steps_shown():  # events reach Flower asynchronously: every one ended
            shown = requests.get(base + "/api/tasks", auth=AUTH, timeout=10).json()
            names = {task["name"] for task in shown.values()}
            ended = {task["state"] for task in shown.values()} <= {"SUCCESS", "FAILURE"}
            return {"vidq.submit", "vidq.poll", "vidq.download"} <= names and ended and shown

        tasks = wait_until(all_steps_shown, 30, "Flower to show every step ended", 0.5)
    finally:
        stop_flower(flower)
    names = {task["name"] for task in tasks.values()}
    assert {"vidq.submit", "vidq.poll", "vidq.download"} <= names
    dump = str(tasks)
    assert "secret garden" not in dump
    assert pipeline.sandbox.config.api_key not in dump

    # Readable rows: every finished task's result names its job and the batch's progress;
    # the step that failed the job is a failed task carrying the job's reason.
    succeeded = [t for t in tasks.values() if t["state"] == "SUCCESS"]
    assert succeeded and all("| batch " in (t["result"] or "") for t in succeeded)
    assert any("done" in t["result"] and "1/2 done" in t["result"] for t in succeeded)
    (failed,) = [t for t in tasks.values() if t["state"] == "FAILURE"]
    assert failed["name"] == "vidq.poll" and "JobFailed" in failed["exception"]
    assert "failed: poll:" in failed["exception"] and "fl:" in failed["exception"]


def test_the_broker_page_counts_jobs_waiting_for_a_slot_per_batch(make_pipeline, tmp_path):
    """With no worker yet, no C is stored and nothing is admitted: every job waits in vidq's
    lines, Celery's queues are empty, and Flower's queue lengths say so per batch, marking
    a paused batch."""
    pipeline = make_pipeline()
    flower, base, log = start_flower(pipeline.env, tmp_path)
    try:
        pipeline.enqueue(write_prompts(tmp_path / "a.txt", ["one", "two", "three"]), "night-a")
        pipeline.enqueue(write_prompts(tmp_path / "b.txt", ["four", "five"]), "night-b")
        pipeline.store.redis.hset(keys.batch("night-b"), "paused", "1")  # as `vidq pause` does
        answer = requests.get(base + "/api/queues/length", auth=AUTH, timeout=10)
        assert answer.status_code == 200, answer.text
        lengths = {q["name"]: q["messages"] for q in answer.json()["active_queues"]}
        page = requests.get(base + "/broker", auth=AUTH, timeout=10).text
    finally:
        stop_flower(flower)
    backlog = {name: n for name, n in lengths.items() if name.startswith(ROW_PREFIX)}
    assert backlog == {TOTAL_ROW: 5, ROW_PREFIX + "night-a": 3,
                       ROW_PREFIX + "night-b (paused)": 2}, f"{lengths}; log {log}"
    queues = {name: n for name, n in lengths.items() if name not in backlog}
    assert set(QUEUES) <= set(queues) and not any(queues.values()), f"{lengths}; log {log}"
    assert f"<td>{ROW_PREFIX}night-a</td>" in page, f"/broker lacks the backlog rows; log {log}"


def test_periodic_state_saves_survive_a_crash(make_pipeline, tmp_path):
    """--persistent saves the task window while Flower runs (in a child process, so the
    event loop never waits for the pickle): a SIGKILLed Flower restarts with the tasks."""
    pipeline = make_pipeline()
    flower, base, log = start_flower(pipeline.env, tmp_path, "--state_save_interval=500")
    try:
        pipeline.start_workers()
        pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["one", "two", "three"]), "saved")
        pipeline.wait_finished("saved")

        def settled():  # no new event for three save intervals: saved after the last
            before = requests.get(base + "/api/tasks", auth=AUTH, timeout=10).json()
            time.sleep(1.5)
            after = requests.get(base + "/api/tasks", auth=AUTH, timeout=10).json()
            return len(before) >= 9 and after == before and before

        seen = wait_until(settled, 30, "Flower's task list to settle", 0)
    finally:
        flower.send_signal(signal.SIGKILL)  # a crash: no save at exit
        flower.wait(10)
    time.sleep(1.5)  # a save child that was writing finishes its rename
    with shelve.open(str(tmp_path / "flower.db"), flag="r") as saved:
        on_disk = set(saved["events"].tasks)
    assert len(seen) >= 9 and set(seen) <= on_disk, f"saved {len(on_disk)} of {len(seen)}; log {log}"
    flower, base, log = start_flower(pipeline.env, tmp_path)
    try:
        restored = requests.get(base + "/api/tasks", auth=AUTH, timeout=10).json()
    finally:
        stop_flower(flower)
    assert set(seen) <= set(restored), f"restarted Flower lost tasks; log {log}"
    assert "Traceback" not in log.read_text(errors="replace"), f"see {log}"
