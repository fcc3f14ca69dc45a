"""Flower's Broker page, told how many jobs wait for an upstream slot.

Pull admission keeps waiting jobs out of Celery's queues (a submit message
exists only once a slot is free), so Flower's Broker page, which counts the
Redis list of each queue a worker consumes, shows about 0 while thousands of
jobs wait. This adds read-only rows to that page (and to Flower's
`/api/queues/length`): one per batch with jobs waiting, plus a total, counted
from the batches' own lines (ZCARD) with Flower's own Redis client when the
page is drawn. Nothing is published and nothing is consumed, so admission
stays pull-based and no worker ever sees these counts as a queue.

Why not a real queue name? Flower finds queue names in the workers'
`active_queues` and counts them with LLEN: any name listed there is one a
worker consumes (BRPOP), and admission lines (sorted sets of job ids) are
not Celery messages. The
README ("Watching the night in Flower") weighs the options.

Flower loads this through its configuration file, `worker/flowerconfig.py`.
"""
from __future__ import annotations

import logging
from typing import Any

from . import keys
from .batch_control import ask_daily_cap

log = logging.getLogger(__name__)

ROW_PREFIX = "vidq: waiting for a slot, "
TOTAL_ROW = ROW_PREFIX + "all batches"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def backlog_rows(client: Any) -> list[dict]:
    """A total row, then one row per batch with jobs waiting for a slot.

    `client` is a redis.asyncio client. "Waiting" is the size of the batch's
    line (`Admission.waiting`): the figure the task summaries print."""
    batches = sorted(_text(name) for name in await client.smembers(keys.BATCHES))
    pipe = client.pipeline(transaction=False)
    for batch in batches:
        pipe.zcard(keys.batch_line(batch))
        pipe.hmget(keys.batch(batch), "paused", "blocked")
    replies = await pipe.execute() if batches else []
    daily_cap = await _daily_cap_reached(client) if batches else False
    rows = []
    for index, batch in enumerate(batches):
        waiting, (paused, blocked) = int(replies[2 * index] or 0), replies[2 * index + 1]
        if waiting > 0:
            rows.append({"name": ROW_PREFIX + batch + _why_held(paused, blocked, daily_cap),
                         "messages": waiting})
    return [{"name": TOTAL_ROW, "messages": sum(row["messages"] for row in rows)}, *rows]


def _why_held(paused: Any, blocked: Any, daily_cap: bool = False) -> str:
    """Why a batch's jobs wait for more than a free slot (`vidq pause`, a spend cap,
    the deployment's daily credit cap)."""
    if paused and _text(paused) == "1":
        return " (paused)"
    if blocked:
        return f" (held: {_text(blocked)})"
    return " (held: daily credit cap)" if daily_cap else ""


async def _daily_cap_reached(client: Any) -> bool:
    """What `vidq status` calls "paused: daily credit cap": the next job in
    turn, priced as the pump prices it, would pass today's cap
    (lua/daily_cap.lua)."""
    from .celery_app import app, settings_of  # Flower's app: `celery -A worker flower`
    return await ask_daily_cap(client, settings_of(app).credit_estimate) == 1


async def _rows_or_none(client: Any) -> list[dict]:
    # The Broker page must still show the real queues if vidq's keys cannot
    # be read (an older Redis layout, a timeout): say so in the log only.
    try:
        return await backlog_rows(client)
    except Exception as exc:  # noqa: BLE001 - a dashboard row is never worth a 500
        log.warning("vidq backlog rows unavailable: %s", exc)
        return []


def install() -> None:
    """Make Flower's Redis broker view append the backlog rows (idempotent)."""
    from flower.utils import broker

    original = getattr(getattr(broker, "RedisBase", None), "queues", None)
    if original is None:
        # A Flower whose internals moved: Flower still starts, without the rows.
        log.warning("vidq backlog rows not installed: flower.utils.broker has no "
                    "RedisBase.queues in this Flower version")
        return
    if getattr(original, "vidq_backlog", False):
        return

    async def queues(self, names):
        # Read before the original runs: it closes the client when done.
        rows = await _rows_or_none(self.redis)
        return [*await original(self, names), *rows]

    queues.vidq_backlog = True  # type: ignore[attr-defined]
    broker.RedisBase.queues = queues
