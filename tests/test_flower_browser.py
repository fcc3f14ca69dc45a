"""Flower in a real browser tells the night's story (issue 15): during a small sandbox batch
with one slot and one prompt the sandbox rejects, Flower (started with the flags
docker-compose.yml documents, behind basic auth) shows the worker online, the jobs waiting
for a slot on its Broker page, task rows with job refs and one-line summaries, and its
Failed filter lists exactly the rejected job with its reason.

Headless Chromium (Debian's /usr/bin/chromium) driven by Playwright for Python. A missing
browser or playwright fails the test, in CI and locally: it is never silently skipped.
Screenshots go to the test's tmp_path; every failure message names the one to look at.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import socket
import time

import pytest
import requests
from conftest import write_prompts
from test_flower import AUTH, start_flower, stop_flower

from worker import keys
from worker.flower_backlog import ROW_PREFIX

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
UI_TIMEOUT_MS = 15_000  # Flower's first data arrives over events, a few seconds at most
BATCH = "night"
# Four jobs through one slot, ~3 s each: three wait in line at first. The second is refused.
PROMPTS = ["a lighthouse at dusk", "REJECT a scene the content policy refuses",
           "a fox in fresh snow", "rain on a tin roof"]


def _require_browser() -> None:
    missing = []
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package: pip install -e '.[dev]' (or pip install "
                       "playwright; do NOT run `playwright install`, Debian's chromium is used)")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"Chromium at {CHROMIUM}: apt-get update && apt-get install -y chromium")
    if missing:
        where = "in CI (CI=true)" if os.environ.get("CI") == "true" else "on this machine"
        pytest.fail(f"Flower browser test cannot run {where}; missing " + "; and ".join(missing),
                    pytrace=False)


@pytest.mark.slow
def test_flower_in_a_browser_shows_progress_backlog_and_failures(make_pipeline, make_sandbox,
                                                                  tmp_path):
    _require_browser()
    from playwright.sync_api import sync_playwright

    pipeline = make_pipeline(make_sandbox(time_scale=30.0), VIDQ_MAX_IN_FLIGHT=1)
    # Started before the worker, so Flower sees its worker-online event and every task event.
    flower, base, flower_log = start_flower(pipeline.env, tmp_path)
    try:
        pipeline.start_workers()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                check_refused_without_credentials(browser, base, tmp_path)
                context = browser.new_context(
                    http_credentials={"username": AUTH[0], "password": AUTH[1]})
                context.set_default_timeout(UI_TIMEOUT_MS)
                page = context.new_page()
                pipeline.enqueue(write_prompts(tmp_path / "p.txt", PROMPTS), BATCH)
                check_backlog_on_broker_page(page, base, tmp_path)
                counts = pipeline.wait_finished(BATCH)
                assert (counts["done"], counts["failed"]) == (3, 1), counts
                check_worker_online(page, base, tmp_path)
                jobs = [pipeline.store.get(keys.job_ref(BATCH, i))
                        for i in pipeline.store.job_ids(BATCH)]
                wait_for_all_events(base, expected_failures=1)
                check_task_rows(page, base, tmp_path, jobs)
                (rejected,) = [job for job in jobs if job.state == "failed"]
                check_failed_filter(page, tmp_path, rejected)
            finally:
                browser.close()
    finally:
        stop_flower(flower)
    assert "Traceback" not in flower_log.read_text(errors="replace"), f"see {flower_log}"


def check_refused_without_credentials(browser, base: str, tmp_path) -> None:
    """Chromium either shows the 401 or aborts with net::ERR_INVALID_AUTH_CREDENTIALS."""
    from playwright.sync_api import Error as PlaywrightError

    shot = tmp_path / "flower-no-auth.png"
    anonymous = browser.new_context()
    page = anonymous.new_page()
    try:
        response = page.goto(base + "/workers")
        refused = f"HTTP {response.status if response else None}"
    except PlaywrightError as error:
        refused = str(error).splitlines()[0]
    page.screenshot(path=str(shot), full_page=True)
    shown = page.locator("#workers-table").count()
    assert ("401" in refused or "ERR_INVALID_AUTH_CREDENTIALS" in refused) and shown == 0, (
        f"Flower without credentials was not refused: {refused}, workers table shown "
        f"{shown}; screenshot {shot}")
    anonymous.close()


def check_backlog_on_broker_page(page, base: str, tmp_path) -> None:
    """While jobs wait for the one slot, the Broker page counts them for the batch."""
    shot = tmp_path / "flower-broker-backlog.png"
    page.goto(base + "/broker")
    page.screenshot(path=str(shot), full_page=True)
    rows = page.locator("#queue-table tbody tr").all_inner_texts()
    row = page.locator("#queue-table tbody tr", has_text=ROW_PREFIX + BATCH)
    assert row.count() == 1, f"no backlog row for {BATCH} on /broker: {rows}; screenshot {shot}"
    waiting = row.locator("td").nth(1).inner_text()
    assert waiting in ("1", "2", "3"), (
        f"backlog row shows {waiting!r} waiting, expected 1 to 3 of {len(PROMPTS)} jobs "
        f"with one slot; rows {rows}; screenshot {shot}")


def check_worker_online(page, base: str, tmp_path) -> None:
    shot = tmp_path / "flower-workers.png"
    worker_name = f"test0@{socket.gethostname()}"
    page.goto(base + "/workers")
    online = page.locator("#workers-table tbody tr", has_text=worker_name).filter(
        has=page.locator(".badge", has_text="Online"))
    wait_quietly(online.first)
    page.screenshot(path=str(shot), full_page=True)
    rows = page.locator("#workers-table tbody tr").all_inner_texts()
    assert online.count() == 1, (f"worker {worker_name} not listed Online on /workers; rows "
                                 f"{rows}; screenshot {shot}")


def wait_for_all_events(base: str, expected_failures: int, timeout_s: float = 10.0) -> None:
    """Task events reach Flower asynchronously: wait until every download and failure did."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tasks = requests.get(base + "/api/tasks", auth=AUTH, timeout=10).json().values()
        states = [(t["name"], t["state"]) for t in tasks]
        if (states.count(("vidq.download", "SUCCESS")) == len(PROMPTS) - expected_failures
                and [s for _, s in states].count("FAILURE") == expected_failures):
            return
        time.sleep(0.3)


def show_all_tasks(page, base: str) -> None:
    page.goto(base + "/tasks")
    page.locator("#tasks-table tbody tr td a").first.wait_for(state="visible")
    # 15 rows a page by default; this batch runs a few dozen tasks.
    page.locator("#tasks-table_length select").select_option("100")
    page.locator("#tasks-table_info",
                 has_text=re.compile(r"Showing 1 to (\d+) of \1 tasks")).wait_for()


def check_task_rows(page, base: str, tmp_path, jobs) -> None:
    """Rows name their job (args) and say what happened and how far the batch is (result)."""
    shot = tmp_path / "flower-tasks.png"
    show_all_tasks(page, base)
    page.screenshot(path=str(shot), full_page=True)
    rows = page.locator("#tasks-table tbody tr").all_inner_texts()
    for job in jobs:
        assert sum(job.ref in row for row in rows) >= 2, (
            f"job {job.ref} not in the task rows; rows {rows}; screenshot {shot}")
        if job.state == "done":
            assert any(f"{job.ref} done, " in row and "| batch " in row for row in rows), (
                f"no summary saying {job.ref} is done; rows {rows}; screenshot {shot}")
    waiting = re.compile(rf"batch \d/{len(PROMPTS)} done, \d failed, [1-3] waiting")
    assert any(waiting.search(row) for row in rows), (
        f"no summary shows jobs waiting for a slot; rows {rows}; screenshot {shot}")
    assert any(f"batch 3/{len(PROMPTS)} done, 1 failed, 0 waiting" in row for row in rows), (
        f"no summary shows the finished batch; rows {rows}; screenshot {shot}")


def check_failed_filter(page, tmp_path, rejected) -> None:
    """The Failed filter lists exactly the rejected job, with the upstream's reason."""
    shot = tmp_path / "flower-failed-filter.png"
    page.locator(".task-state-filter[data-task-state='FAILURE']").click()
    wait_quietly(page.locator("#tasks-table_info", has_text=re.compile(r"of 1 tasks")))
    page.screenshot(path=str(shot), full_page=True)
    rows = page.locator("#tasks-table tbody tr").all_inner_texts()
    assert len(rows) == 1 and "FAILURE" in rows[0], (
        f"the Failed filter shows {len(rows)} rows, expected the one rejected job: {rows}; "
        f"screenshot {shot}")
    reason = rejected.last_error
    assert rejected.ref in rows[0] and reason and reason in rows[0], (
        f"the failed row lacks job {rejected.ref} or its reason {reason!r}: {rows[0]}; "
        f"screenshot {shot}")


def wait_quietly(locator) -> None:
    """Wait for what the next assertion checks; on timeout, let the assertion report it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    with contextlib.suppress(PlaywrightTimeout):
        locator.wait_for(state="visible")
