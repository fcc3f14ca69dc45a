"""Flower in a real browser: behind basic auth, its workers page shows the running worker
online and its tasks page lists vidq's submit, poll and download tasks (issue 12, section 5).

Headless Chromium (Debian's /usr/bin/chromium) driven by Playwright for Python. A missing
browser or playwright fails the test, in CI and locally: it is never silently skipped.
"""
from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys

import pytest
import requests
from conftest import wait_http, write_prompts

from producer.redis_server import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
AUTH = ("user", "pass")
VIDQ_TASKS = ("vidq.submit", "vidq.poll", "vidq.download")
UI_TIMEOUT_MS = 20_000  # Flower's first data arrives over events, a few seconds at most


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


def test_flower_pages_in_a_browser_show_the_worker_online_and_vidq_tasks(make_pipeline,
                                                                         tmp_path):
    _require_browser()
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    pipeline = make_pipeline()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    flower_log = tmp_path / "flower.log"
    # Started before the worker, so Flower sees its worker-online event and every task event.
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={port}",
         "--address=127.0.0.1", f"--basic-auth={AUTH[0]}:{AUTH[1]}"],
        env=pipeline.env, stdout=open(flower_log, "wb"), stderr=subprocess.STDOUT)
    try:
        wait_http(base + "/healthcheck", flower, flower_log)
        pipeline.start_workers()
        worker_name = f"test0@{socket.gethostname()}"
        prompts = ["a lighthouse at dusk", "a fox in fresh snow", "rain on a tin roof"]
        pipeline.enqueue(write_prompts(tmp_path / "p.txt", prompts), "fb")
        counts = pipeline.wait_finished("fb")
        assert counts["done"] == 3, counts

        workers_png = tmp_path / "flower-workers.png"
        tasks_png = tmp_path / "flower-tasks.png"
        denied_png = tmp_path / "flower-no-auth.png"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                # Without credentials the browser is refused: Chromium either shows the 401
                # or aborts the navigation with net::ERR_INVALID_AUTH_CREDENTIALS.
                anonymous = browser.new_context()
                page = anonymous.new_page()
                try:
                    response = page.goto(base + "/workers")
                    refused = f"HTTP {response.status if response else None}"
                except PlaywrightError as error:
                    refused = str(error).splitlines()[0]
                page.screenshot(path=str(denied_png), full_page=True)
                shown = page.locator("#workers-table").count()
                assert ("401" in refused or "ERR_INVALID_AUTH_CREDENTIALS" in refused) \
                    and shown == 0, (f"Flower without credentials was not refused: {refused}, "
                                     f"workers table shown {shown}; screenshot {denied_png}")
                anonymous.close()

                context = browser.new_context(
                    http_credentials={"username": AUTH[0], "password": AUTH[1]})
                context.set_default_timeout(UI_TIMEOUT_MS)
                page = context.new_page()

                # Workers page: the server renders the row, DataTables redraws it from JSON
                # with an Online badge.
                response = page.goto(base + "/workers")
                status = response.status if response else None
                assert status == 200, f"/workers answered {status}; screenshot {workers_png}"
                row = page.locator("#workers-table tbody tr", has_text=worker_name)
                online_row = row.filter(has=page.locator(".badge", has_text="Online"))
                try:
                    online_row.first.wait_for(state="visible")
                    page.locator("#workers-online", has_text=re.compile(r"^1$")).wait_for()
                except PlaywrightTimeout:
                    pass  # the assertions below report what the page shows
                page.screenshot(path=str(workers_png), full_page=True)
                rows = page.locator("#workers-table tbody tr").all_inner_texts()
                assert online_row.count() == 1, (
                    f"worker {worker_name} not listed Online on /workers; rows {rows}; "
                    f"screenshot {workers_png}; flower log {flower_log}")
                online = page.locator("#workers-online").inner_text()
                assert online == "1", (f"'Online workers' shows {online!r}, expected 1; "
                                       f"screenshot {workers_png}")
                api = requests.get(base + "/workers?json=1", auth=AUTH, timeout=10).json()
                statuses = {w["hostname"]: w["status"] for w in api["data"]}
                assert statuses.get(worker_name) is True, (
                    f"/workers?json=1 status {statuses}; screenshot {workers_png}")

                # Tasks page: rows arrive through a POST to /tasks/datatable after load.
                page.goto(base + "/tasks")
                table = page.locator("#tasks-table")
                try:
                    table.locator("tbody tr td a").first.wait_for(state="visible")
                    # 15 rows a page by default; a 3-prompt batch may run more tasks.
                    page.locator("#tasks-table_length select").select_option("100")
                    # Every task on this one page once the redraw from the new JSON is done.
                    page.locator("#tasks-table_info",
                                 has_text=re.compile(r"Showing 1 to (\d+) of \1 tasks")).wait_for()
                    for name in VIDQ_TASKS:
                        table.get_by_role("link", name=name, exact=True).first.wait_for(
                            state="visible")
                except PlaywrightTimeout:
                    pass
                page.screenshot(path=str(tasks_png), full_page=True)
                task_rows = table.locator("tbody tr").all_inner_texts()
                for name in VIDQ_TASKS:
                    links = table.get_by_role("link", name=name, exact=True).count()
                    assert links >= 1, (f"{name} not listed on /tasks; rows {task_rows}; "
                                        f"screenshot {tasks_png}; flower log {flower_log}")
                submits = table.get_by_role("link", name="vidq.submit", exact=True).count()
                downloads = table.get_by_role("link", name="vidq.download", exact=True).count()
                assert (submits, downloads) == (3, 3), (
                    f"expected 3 submits and 3 downloads on /tasks, saw {submits} and "
                    f"{downloads}; rows {task_rows}; screenshot {tasks_png}")
                context.close()
            finally:
                browser.close()
    finally:
        flower.terminate()
        flower.wait(10)
