"""The "POST started" marker: written on the job before its POST, made durable
(worker/durability.py) or cleared again, so that a redelivered or recovered
submit never POSTs a second time.

A marker whose durability cannot be had (a replica not acknowledging, an
fsync stalled, a wait Redis refuses) is cleared at once, nothing having been
sent, and `vidq status` says why (`keys.MARKER_NOT_DURABLE`) until a marker
is found durable again. Redis unreachable meanwhile is waited out for the
step's patience. Past it the worker still knows that nothing was sent: it
waits up to `OUTAGE_PATIENCE_S` more to clear its marker (the job then tries
again, or is revived if it was taken over meanwhile), and only then gives
up: MarkerUnconfirmed names the marker, so the next try may take it over.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import NoReturn, TypeVar

import redis

from . import keys
from .connection import op_id
from .durability import Durability, NotDurable
from .errors import MarkerUnconfirmed
from .jobs import Job, JobStore
from .paid_journal import new_deployment_id

# How long `vidq status` says a POST marker could not be made durable (its job
# tries again in 5 s: pipeline.MARKER_RETRY_S); the next durable one clears it.
NOT_DURABLE_SHOWN_MS = 15_000
# Redis away past the step's patience (a restart loading a big AOF, a
# failover): how much longer a submit waits to clear its marker. Without it,
# the retry that names the marker could not be written either, and the job
# ended "outcome unknown" with nothing sent.
OUTAGE_PATIENCE_S = 300.0
Answer = TypeVar("Answer")


def mark_posting(store: JobStore, job: Job, durability: Durability,
                 patience_s: float = 0.0) -> str:
    """Write the marker and wait until it is durable; see lua/mark_posting.lua
    for the answers. A job whose batch was cancelled (after the submit's own
    check) ends cancelled here, and the answer is 'stale': the step stops,
    nothing is sent. NotDurable (its `mine`: the marker cleared was this
    try's) if it cannot be made durable now."""
    op = op_id()

    def build(pipe) -> None:
        store.script("mark_posting")(
            keys=[keys.job(job.ref), keys.batch(job.batch)],
            args=[job.token, op, str(job.extra.get("unconfirmed_op", ""))], client=pipe)
        # The Redis this marker went to, for the paid-id journal (worker/paid_journal.py).
        pipe.hsetnx(keys.CONFIG, "deployment_id", new_deployment_id())
        pipe.hget(keys.CONFIG, "deployment_id")
        durability.append_waits(pipe)
        pipe.exists(keys.MARKER_NOT_DURABLE)  # `vidq status` says one was not

    give_up_at = time.monotonic() + patience_s
    try:
        answer, _, deployment, *waits, warned = _patiently(
            lambda: store.run_with_waits(build), op, give_up_at,
            "the POST marker's answer was lost")
    except MarkerUnconfirmed as exc:
        _withdraw(store, job, op, exc)
    if answer == "ok":
        job.extra["posting_op"] = op  # names this attempt's marker (clear_posting)
        job.extra["deployment"] = deployment if isinstance(deployment, str) else ""
        _check_durable(store, job, durability, waits)
        if warned:
            with contextlib.suppress(redis.RedisError):
                store.redis.delete(keys.MARKER_NOT_DURABLE)
    if answer == "cancelled":
        store.back_in_line(job, 0.0, rate_limited=False)  # ends it cancelled, slot freed
        return "stale"
    return answer


def _withdraw(store: JobStore, job: Job, op: str, lost: MarkerUnconfirmed) -> NoReturn:
    """Redis stayed away past the step's patience, the marker written or not:
    nothing was sent. Clear it once Redis answers, and raise NotDurable (its
    `mine`: a marker cleared was this try's, or the never-POSTed one it was
    taking over); MarkerUnconfirmed if Redis is still away after
    OUTAGE_PATIENCE_S."""
    # The earlier try's marker this try was taking over (it never POSTed) goes
    # too: the next try then names this one's, should it land late.
    earlier = str(job.extra.get("unconfirmed_op", ""))

    def clear() -> bool:
        mine = store.clear_posting(job, op)
        took_over = bool(earlier) and store.clear_posting(job, earlier)
        return mine or took_over

    mine = _patiently(clear, op, time.monotonic() + OUTAGE_PATIENCE_S,
                      "the POST marker's answer was lost, and its clear's")
    why = NotDurable(f"{lost}; its marker is cleared" if mine else str(lost))
    # A marker call held up in the network may still land after the clear:
    # the next try may take it over, as it never POSTed (MarkerUnconfirmed's).
    why.mine, why.carried = mine, lost.carried
    raise why


def _check_durable(store: JobStore, job: Job, durability: Durability, waits: list) -> None:
    """Returns if the marker's waits passed; else clears it and raises
    NotDurable. Redis lost while the waits' answers are looked at again
    (Durability.check reads its settings) leaves them unknown: not durable.
    The clear waits out Redis for OUTAGE_PATIENCE_S: nothing was sent, and a
    worker that stood still here, its job taken over meanwhile, must still
    clear its marker to revive the job."""
    try:
        durability.check(waits)
        return
    except NotDurable as exc:
        why = exc
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        why = NotDurable(f"Redis was lost while the POST marker was checked ({exc})")
    why.mine = _patiently(lambda: store.clear_posting(job), str(job.extra["posting_op"]),
                          time.monotonic() + OUTAGE_PATIENCE_S,
                          "the POST marker could not be cleared")
    with contextlib.suppress(redis.RedisError):
        store.redis.set(keys.MARKER_NOT_DURABLE, str(why)[:300], px=NOT_DURABLE_SHOWN_MS)
    raise why


def _patiently(call: Callable[[], Answer], op: str, give_up_at: float, lost: str) -> Answer:
    """call(), sent again while Redis cannot be reached, until give_up_at; then
    MarkerUnconfirmed names marker `op` (its calls carry ids: one that ran
    answers as it did)."""
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() >= give_up_at:
                raise MarkerUnconfirmed(f"{lost} ({exc}); nothing was sent", op=op) from None
            time.sleep(0.5)
