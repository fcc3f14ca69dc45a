"""Pause, resume, cancel and spend caps of a batch, as admission sees them.

Each is a change to the batch's hash (`lua/batch_settings.lua`, atomic with
putting the batch back in its ring); the pump reads the hash when the batch's
turn comes, so nothing already admitted is touched: generations in flight
finish and are downloaded (they are paid for). Cancel ends the waiting jobs
`cancelled` in chunks, each one atomic script, after marking the batch so the
pump and every put-back script leave it alone from the first chunk on.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from . import keys
from .admission import PRIORITIES, Admission
from .errors import InputError
from .jobs import State, load_script

CANCEL_CHUNK = 1000


@dataclass(frozen=True)
class CancelResult:
    cancelled: int  # waiting jobs ended `cancelled`
    in_flight: int  # POSTed, or their POST on its way: paid, left to finish
    unsent: int = 0  # admitted, POST not started: they end `cancelled` too


def check_batch(admission: Admission, batch: str) -> None:
    """Raise InputError unless `batch` has jobs."""
    if admission.store.batch_total(batch) == 0:
        raise InputError(f"no batch named {batch!r}")


def _check_open(admission: Admission, batch: str) -> None:
    check_batch(admission, batch)
    if admission.redis.hget(keys.batch(batch), "cancelled") == "1":
        raise InputError(f"batch {batch!r} was cancelled")


def pause(admission: Admission, batch: str) -> int:
    """Stop admitting `batch`; returns how many of its jobs wait."""
    _check_open(admission, batch)
    admission.configure(batch, {"paused": "1"}, existing=True)
    return admission.waiting(batch)


def resume(admission: Admission, batch: str) -> int:
    """Admit `batch` again; returns how many of its jobs wait."""
    _check_open(admission, batch)
    admission.configure(batch, {"paused": None}, existing=True)
    return admission.waiting(batch)


def cancel(admission: Admission, batch: str) -> CancelResult:
    """End `batch`'s waiting jobs `cancelled`; those in flight finish."""
    check_batch(admission, batch)
    cancelled = 0
    while True:
        taken, ended = admission.cancel_waiting(batch, CANCEL_CHUNK)
        cancelled += ended
        if taken == 0:
            break
    # A job admitted but still `queued` is paid for once its POST has started
    # (`posting_at`); before that, its submit sees the cancel and ends it.
    holders = _holders(admission, batch, "state", "posting_at")
    sending = sum(1 for state, posting in holders if state == State.QUEUED and posting)
    unsent = sum(1 for state, posting in holders if state == State.QUEUED and not posting)
    paid = posted_in_flight(Counter(state for state, _posting in holders)) + sending
    return CancelResult(cancelled, paid, unsent)


def posted_in_flight(holders: Counter) -> int:
    """Slot holders POSTed and generating; not a failed one whose slot is only
    held for a POST of unknown outcome (it is counted as failed)."""
    return sum(count for state, count in holders.items()
               if state not in (State.QUEUED, State.FAILED))


def slot_holders(admission: Admission, batch: str) -> Counter:
    """The states of `batch`'s jobs that hold an upstream slot now (O(C))."""
    return Counter(state for (state,) in _holders(admission, batch, "state"))


def _holders(admission: Admission, batch: str, *fields: str) -> list[tuple]:
    """`fields` of each of `batch`'s jobs that hold an upstream slot now."""
    prefix = keys.job_ref(batch, "")
    refs = [str(ref) for ref in admission.redis.zrange(keys.SLOTS, 0, -1)
            if str(ref).startswith(prefix)]
    pipe = admission.redis.pipeline(transaction=False)
    for ref in refs:
        pipe.hmget(keys.job(ref), list(fields))
    return [tuple(values) for values in pipe.execute() if values[0] is not None]


def set_limits(admission: Admission, batch: str, **limits: float | None) -> None:
    """Set max_credits / max_videos of `batch` (None removes one); a batch
    held by a spend cap is checked again at once."""
    _check_open(admission, batch)
    admission.configure(batch, {name: _plain(value) for name, value in limits.items()},
                        existing=True)


def set_priority(admission: Admission, batch: str, priority: str) -> None:
    if priority not in PRIORITIES:
        raise InputError(f"priority {priority!r}: use one of {', '.join(PRIORITIES)}")
    _check_open(admission, batch)
    admission.configure(batch, {"priority": priority}, existing=True)


def set_daily_credits(admission: Admission, credits: float | None) -> None:
    """The deployment's daily credit cap, for every worker (None removes it)."""
    if credits is None:
        admission.redis.hdel(keys.CONFIG, "daily_credits")
    else:
        admission.redis.hset(keys.CONFIG, "daily_credits", _plain(credits))


def admission_state(admission: Admission, batch: str) -> str:
    """'purging', 'cancelled', 'paused', 'paused: spend cap', 'paused: daily
    credit cap' or 'open': what `vidq status` shows."""
    cancelled, paused, blocked, purging = admission.redis.hmget(
        keys.batch(batch), "cancelled", "paused", "blocked", "purging")
    if purging:
        return "purging"
    if cancelled == "1":
        return "cancelled"
    if paused == "1":
        return "paused"
    if blocked:
        return "paused: spend cap"  # the one hold the pump sets
    if admission.waiting(batch) and daily_cap_reached(admission):
        return "paused: daily credit cap"  # (none waiting: nothing of it is held)
    return "open"


def daily_cap_reached(admission: Admission) -> bool:
    """Whether the next job in turn would pass today's credit cap, priced as
    the pump prices it (lua/daily_cap.lua). False while no job waits: the cap
    holds nothing back."""
    return ask_daily_cap(admission.redis, admission.credits.default) == 1


def ask_daily_cap(client, default_estimate: float):
    """lua/daily_cap.lua's answer (1: reached); awaitable with an asyncio
    client (Flower's)."""
    script = load_script(client, "daily_cap", ("line_lib",))
    return script(keys=[keys.CONFIG, keys.SLOTS], args=[repr(default_estimate), *PRIORITIES])


def _plain(value: float | None) -> str | None:
    if value is None:
        return None
    return str(int(value)) if float(value).is_integer() else repr(float(value))
