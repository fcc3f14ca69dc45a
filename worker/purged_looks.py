"""Ask the upstream about purged generations that may still run.

`vidq purge --force` removes jobs whose generations may still run upstream;
each keeps its slot as a hold (lua/purge_jobs.lua), or the next batch is
admitted while they run and C is passed. A hold's length was guessed from
the learned generation time, and an upstream that got slower since outlived
the guess: 4 in flight at C = 2 (review 116). Such a generation's id is
known, and a status GET costs nothing, so once its hold runs out it is asked
about, and its slot is kept as a polled job's is (lua/purged_answer.lua):
- still running (or any error): the hold stays `LOOK_AGAIN_S` more, up to
  `VIDQ_HARD_LIMIT_S` after its admission (lua/release_holds.lua); bounded
  by `VIDQ_DEADLINE_S`, a generation slower than that lost its slot while
  it ran: C passed (review 121);
- ended or failed: the hold ends in the same step and the slot is filled
  at once;
- not known (404, 410): it ends only past `VIDQ_DEADLINE_S`, after
  `NOT_FOUND_TO_GIVE_UP` such answers in a row over `VIDQ_BACKOFF_CAP_S`,
  as a polled job's slot is given up (StepOutcomes._not_found): a gateway's
  one 404 freed the slots of two running generations (review 119).
A pause on status GETs waits, and a 429 to a look is such a pause for every
worker.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import redis

from . import keys
from .admission import Admission
from .contract import FORGOTTEN_STATUSES
from .errors import RateLimited, UpstreamError
from .generation import Generation
from .jobs import load_script
from .rate_limits import pause_s
from .step_outcomes import NOT_FOUND_TO_GIVE_UP

log = logging.getLogger(__name__)

LOOK_AGAIN_S = 10.0
LOOKS_PER_PASS = 100


def look_at_purged_generations(admission: Admission, fetch: Callable[[str], Generation],
                               pause_polls: Callable[[float], None],
                               fill_slots: Callable[[], object], not_found_for_s: float) -> int:
    """One pass over the purged generations whose hold has run out; returns
    how many holds ended (run in a thread of its own: a Redis error ends the
    pass, the next one tries again). A 429 pauses status GETs for every
    worker, as a poll's does, and ends the pass (review 118)."""
    try:
        ended = _look(admission, fetch, not_found_for_s)
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


def _look(admission: Admission, fetch: Callable[[str], Generation],
          not_found_for_s: float) -> int:
    client = admission.redis
    if client.pttl(keys.PAUSE_POLL) > 0:
        return 0
    seconds, micros = client.time()
    due = [str(name) for name in client.zrangebyscore(
        keys.SLOT_HOLDS, "-inf", seconds + micros / 1e6, start=0, num=LOOKS_PER_PASS)]
    ids = client.hmget(keys.PURGED_GENERATIONS, due) if due else []
    told = load_script(client, "purged_answer")
    ended = 0
    for name, generation_id in zip(due, ids, strict=True):
        if generation_id:
            answer = _answer(fetch, str(generation_id))
            ended += int(told(keys=[keys.SLOT_HOLDS, keys.SLOTS], args=[
                name, generation_id, answer, LOOK_AGAIN_S, admission.longest_hold_s,
                not_found_for_s, NOT_FOUND_TO_GIVE_UP]))
    return ended


def _answer(fetch: Callable[[str], Generation], generation_id: str) -> str:
    """'running', 'ended' (completed or failed) or 'not known' (404, 410)."""
    try:
        return "running" if fetch(generation_id).pending else "ended"
    except RateLimited:
        raise
    except UpstreamError as exc:
        log.info("purged generation %s: %s; its slot stays taken", generation_id, exc)
        return "not known" if exc.status in FORGOTTEN_STATUSES else "running"
