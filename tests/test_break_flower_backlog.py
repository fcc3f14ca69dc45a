"""The Broker page's backlog rows (worker/flower_backlog.py): each batch's row names what
holds it back as `vidq status` does (paused, spend cap, the daily credit cap; a cancelled
batch has none), and the hook never costs the Flower it decorates: Flower started while
Redis is down answers, and gains the rows once Redis is back; Flower whose internals
moved (the modules the hooks wrap gone) starts without the hooks and says why."""
from __future__ import annotations

import asyncio
import time

import redis.asyncio
import requests
from conftest import write_prompts
from test_flower import AUTH, start_flower, stop_flower

from worker import batch_control, keys
from worker.flower_backlog import ROW_PREFIX, TOTAL_ROW, backlog_rows

MOVED_INTERNALS_CONF = """\
# vidq's Flower configuration loaded by a Flower whose internals moved: while it runs,
# neither flower.utils.broker nor flower.events can be imported.
def _load_with_moved_internals():
    import sys

    import flower.utils

    moved = {name: sys.modules[name] for name in ("flower.utils.broker", "flower.events")}
    for name in moved:
        sys.modules[name] = None
    del flower.utils.broker, flower.events
    try:
        import worker.flowerconfig  # noqa: F401
    finally:
        sys.modules.update(moved)
        flower.utils.broker, flower.events = moved["flower.utils.broker"], moved["flower.events"]


_load_with_moved_internals()
"""


def _backlog(base: str) -> dict[str, int]:
    answer = requests.get(base + "/api/queues/length", auth=AUTH, timeout=10)
    assert answer.status_code == 200, answer.text
    return {q["name"]: q["messages"] for q in answer.json()["active_queues"]
            if q["name"].startswith(ROW_PREFIX)}


def _rows(url: str) -> dict[str, int]:
    async def read() -> list[dict]:
        client = redis.asyncio.Redis.from_url(url)
        try:
            return await backlog_rows(client)
        finally:
            await client.aclose()

    return {row["name"]: row["messages"] for row in asyncio.run(read())}


def test_rows_name_every_hold_as_vidq_status_does(make_pipeline, tmp_path):
    pipeline = make_pipeline()
    admission = pipeline.admission
    for batch, prompts in (("open", ["a", "b"]), ("capped", ["c", "d", "e"]),
                           ("held", ["f"]), ("gone", ["g", "h"])):
        pipeline.enqueue(write_prompts(tmp_path / f"{batch}.txt", prompts), batch)
    batch_control.set_limits(admission, "capped", max_videos=1)
    batch_control.pause(admission, "held")
    batch_control.cancel(admission, "gone")
    admission.set_cap(3)
    assert len(admission.pump()) == 3  # open 1, capped 1, open 2
    admission.set_cap(5)
    assert admission.pump() == []  # capped's next would pass max_videos: held there
    admission.set_cap(6)
    batch_control.set_daily_credits(admission, 1.0)  # three admitted jobs are over it
    pipeline.enqueue(write_prompts(tmp_path / "later.txt", ["i"]), "later")
    assert batch_control.admission_state(admission, "later") == "paused: daily credit cap"
    assert batch_control.admission_state(admission, "capped") == "paused: spend cap"
    assert _rows(pipeline.settings.redis_url) == {
        TOTAL_ROW: 4, ROW_PREFIX + "capped (held: spend cap)": 2, ROW_PREFIX + "held (paused)": 1,
        ROW_PREFIX + "later (held: daily credit cap)": 1}


def test_flower_started_while_redis_is_down_shows_the_rows_once_it_is_back(
        make_pipeline, restartable_redis, tmp_path):
    pipeline = make_pipeline(VIDQ_REDIS_URL=restartable_redis.url)
    restartable_redis.stop()
    flower, base, log = start_flower(pipeline.env, tmp_path)
    try:
        page = requests.get(base + "/broker", auth=AUTH, timeout=15)
        assert page.status_code == 200 and ROW_PREFIX not in page.text, f"log {log}"
        restartable_redis.start()
        pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["one", "two"]), "late")
        deadline, rows = time.monotonic() + 10, {}
        while time.monotonic() < deadline and not rows:
            rows = _backlog(base)
            time.sleep(0.2)
    finally:
        stop_flower(flower)
    assert rows == {TOTAL_ROW: 2, ROW_PREFIX + "late": 2}, f"{rows}; log {log}"


def test_flower_whose_internals_moved_starts_without_the_hooks(make_pipeline, tmp_path):
    pipeline = make_pipeline()
    conf = tmp_path / "moved.py"
    conf.write_text(MOVED_INTERNALS_CONF)
    flower, base, log = start_flower(pipeline.env, tmp_path, f"--conf={conf}")
    try:
        pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["one"]), "moved")
        rows = _backlog(base)
    finally:
        stop_flower(flower)
    assert rows == {}, rows
    text = log.read_text(errors="replace")
    for hook in ("worker.flower_backlog", "worker.flower_save"):
        assert f"{hook} not installed" in text, f"{hook}: no word of it in {log}"


def test_rows_price_the_next_job_as_the_pump_does(make_pipeline, tmp_path):
    """Deployment estimates of 60,000 credits for 480P and 300,000 for 720P (the
    default is 120,000), a daily cap of 200,000. With 100,000 spent a 480P job
    fits, so its batch is not shown held; with nothing spent a 720P job does not
    fit, so its batch is. (Flower priced both at the default and said the
    opposite of the pump.)"""
    pipeline = make_pipeline(VIDQ_CREDIT_ESTIMATES=(
        "alibaba/wan2.1-t2v-turbo@480P=60000,alibaba/wan2.1-t2v-turbo@720P=300000"))
    admission, client = pipeline.admission, pipeline.store.redis
    admission.publish_estimates(admission.credits)  # as a starting worker does
    batch_control.set_daily_credits(admission, 200000.0)
    today = keys.spend_day(int(client.time()[0]) // 86400)
    client.hset(today, "spent", 100000)
    pipeline.enqueue(write_prompts(tmp_path / "c.txt", ["cheap"]), "cheap", resolution="480P")
    cheap = _rows(pipeline.settings.redis_url)
    batch_control.cancel(admission, "cheap")
    client.hset(today, "spent", 0)
    pipeline.enqueue(write_prompts(tmp_path / "d.txt", ["dear"]), "dear", resolution="720P")

    assert cheap == {TOTAL_ROW: 1, ROW_PREFIX + "cheap": 1}
    assert _rows(pipeline.settings.redis_url) == {
        TOTAL_ROW: 1, ROW_PREFIX + "dear (held: daily credit cap)": 1}
