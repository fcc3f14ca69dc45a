"""Ask the upstream about purged generations that may still run.

`vidq purge --force` removes jobs whose generations may still run upstream;
each keeps its slot as a hold (lua/purge_jobs.lua), or the next batch is
admitted while they run and C is passed. A hold's length was guessed from
the learned generation time, and an upstream that got slower since outlived
the guess: 4 in flight at C = 2 (review 116). Such a generation's id is
known, and a status GET costs nothing, so once its hold runs out it is asked
about: still running, the hold stays `LOOK_AGAIN_S` more; ended or failed,
the hold ends in the same step (lua/end_purged_hold.lua) and the slot is
filled at once. Any error, a 404 or 410 included, asks again later: a
gateway's 404s while it runs are no proof it ended (one freed both slots of
two running generations, C passed; review 119), and the poll path gives a
slot up on them only past the deadline too. A pause on status GETs waits.
`VIDQ_DEADLINE_S` after its admission the hold ends regardless, as every
hold does (lua/release_holds.lua).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import redis

from . import keys
from .admission import Admission
from .errors import RateLimited, UpstreamError
from .generation import Generation
from .rate_limits import pause_s

log = logging.getLogger(__name__)

LOOK_AGAIN_S = 10.0
LOOKS_PER_PASS = 100


def look_at_purged_generations(admission: Admission, fetch: Callable[[str], Generation],
                               pause_polls: Callable[[float], None],
                               fill_slots: Callable[[], object]) -> int:
    """One pass over the purged generations whose hold has run out; returns
    how many holds ended (run in a thread of its own: a Redis error ends the
    pass, the next one tries again). A 429 pauses status GETs for every
    worker, as a poll's does, and ends the pass (review 118)."""
    try:
        ended = _look(admission, fetch)
        if ended:
            fill_slots()
        return ended
    except RateLimited as exc:
        pause_polls(pause_s(exc))
        log.warning("429 on a purged generation's status: polls paused for every worker")
        return 0
    except redis.RedisError as exc:
        log.warning("purged generations not looked at: %s", exc)
        return 0


def _look(admission: Admission, fetch: Callable[[str], Generation]) -> int:
    client = admission.redis
    if client.pttl(keys.PAUSE_POLL) > 0:
        return 0
    seconds, micros = client.time()
    now = seconds + micros / 1e6
    due = [str(name) for name in client.zrangebyscore(keys.SLOT_HOLDS, "-inf", now,
                                                      start=0, num=LOOKS_PER_PASS)]
    ids = client.hmget(keys.PURGED_GENERATIONS, due) if due else []
    ended = 0
    for name, generation_id in zip(due, ids, strict=True):
        if not generation_id:
            continue
        if _still_running(fetch, str(generation_id)):
            client.zadd(keys.SLOT_HOLDS, {name: now + LOOK_AGAIN_S}, xx=True)
        else:
            ended += admission.end_purged_hold(name, str(generation_id))
    return ended


def _still_running(fetch: Callable[[str], Generation], generation_id: str) -> bool:
    try:
        return fetch(generation_id).pending
    except RateLimited:
        raise
    except UpstreamError as exc:
        log.info("purged generation %s not looked at (%s): its slot stays taken",
                 generation_id, exc)
        return True
