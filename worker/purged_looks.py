"""Ask the upstream about purged generations that may still run.

`vidq purge --force` removes jobs whose generations may still run upstream;
each keeps its slot as a hold (lua/purge_jobs.lua), or the next batch is
admitted while they run and C is passed. A hold's length was guessed from
the learned generation time, and an upstream that got slower since outlived
the guess: 4 in flight at C = 2 (review 116). Such a generation's id is
known, and a status GET costs nothing, so once its hold runs out it is asked
about: still running, the hold stays `LOOK_AGAIN_S` more; ended, failed or
forgotten (404, 410), the hold is let go (lua/release_holds.lua frees it at
its next pass). Any other error, or a pause on status GETs, asks again
later. `VIDQ_DEADLINE_S` after its admission the hold ends regardless, as
every hold does.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import redis

from . import keys
from .contract import FORGOTTEN_STATUSES
from .errors import RateLimited, UpstreamError
from .generation import Generation
from .rate_limits import pause_s

log = logging.getLogger(__name__)

LOOK_AGAIN_S = 10.0
LOOKS_PER_PASS = 100


def look_at_purged_generations(client: redis.Redis, fetch: Callable[[str], Generation],
                               pause_polls: Callable[[float], None]) -> int:
    """One pass over the purged generations whose hold has run out; returns
    how many holds were let go (run in a thread of its own: a Redis error
    ends the pass, the next one tries again). A 429 pauses status GETs for
    every worker, as a poll's does, and ends the pass (review 118)."""
    try:
        return _look(client, fetch)
    except RateLimited as exc:
        pause_polls(pause_s(exc))
        log.warning("429 on a purged generation's status: polls paused for every worker")
        return 0
    except redis.RedisError as exc:
        log.warning("purged generations not looked at: %s", exc)
        return 0


def _look(client: redis.Redis, fetch: Callable[[str], Generation]) -> int:
    if client.pttl(keys.PAUSE_POLL) > 0:
        return 0
    seconds, micros = client.time()
    now = seconds + micros / 1e6
    due = [str(name) for name in client.zrangebyscore(keys.SLOT_HOLDS, "-inf", now,
                                                      start=0, num=LOOKS_PER_PASS)]
    ids = client.hmget(keys.PURGED_GENERATIONS, due) if due else []
    let_go = 0
    for name, generation_id in zip(due, ids, strict=True):
        if generation_id and not _still_running(fetch, str(generation_id)):
            client.hdel(keys.PURGED_GENERATIONS, name)
            let_go += 1
        elif generation_id:
            client.zadd(keys.SLOT_HOLDS, {name: now + LOOK_AGAIN_S}, xx=True)
    return let_go


def _still_running(fetch: Callable[[str], Generation], generation_id: str) -> bool:
    try:
        return fetch(generation_id).pending
    except RateLimited:
        raise
    except UpstreamError as exc:
        if exc.status in FORGOTTEN_STATUSES:
            return False
        log.info("purged generation %s not looked at (%s): its slot stays taken",
                 generation_id, exc)
        return True
