"""What a completion teaches the poll plan, and when it teaches nothing.

Runs after the completion's transition holds, once per job: a poll retried
because its transition was lost must not teach the same sample twice, and a
failure here must never touch a job already on its way to its download.
"""
from __future__ import annotations

import logging

from .contract import shape_of
from .durations import DurationModel
from .jobs import Job, JobStore
from .reaim import aim_dropped, reaim_first_polls
from .settings import Settings

log = logging.getLogger(__name__)

# A first poll later than this times its aim (plus 1 s of dispatch) was held
# back: what it found says nothing about the plan.
LATE_FIRST_POLL = 1.5


def tells_generation_time(job: Job, age_s: float, deadline_s: float) -> bool:
    """Whether the plan may learn from this completion. Not a recovered
    chain's, nor one past its deadline: their delays are vidq's. Nor one found
    at a first poll held back past its aim (a 429 pause; a worker backlog,
    when far past): "done by then" would read as the plan being too late, and
    a pause holds back a whole wave of first polls, enough to drop the plan."""
    if job.extra.get("recovered") or age_s >= deadline_s:
        return False
    if job.polls <= 1 and job.extra.get("held_back"):
        return False
    aim = job.number("first_aim")
    return job.polls > 1 or not aim or age_s <= LATE_FIRST_POLL * aim + 1.0


def learn(durations: DurationModel, store: JobStore, dispatch, settings: Settings,
          job: Job, previous_s: float, age_s: float) -> None:
    """Record that `job` finished after `previous_s` and by `age_s`; re-aim
    pending first polls if the aims dropped. Best effort: logged, never raised."""
    shape = shape_of(job.request)
    try:
        durations.record(*shape, previous_s, age_s, job.number("aimed_second"))
        first_s = durations.plan(*shape).first_s
        if aim_dropped(store.redis, *shape, first_s):
            reaim_first_polls(store, dispatch, shape, first_s,
                              settings.poll_min_interval_s, settings.step_grace_s)
    except Exception:  # noqa: BLE001 - learning is an aside once the job moved on
        log.exception("job %s: learning from its completion failed", job.ref)
