"""What one job's record says: when its next poll is due, when it is overdue,
how long an unknown POST holds its slot (the plan's numbers applied to the
job), whether it is paid, and whether an earlier POST of it may be out."""
from __future__ import annotations

from .contract import shape_of
from .durations import DurationModel
from .jobs import Job, Step
from .schedule import PollPlan
from .settings import Settings


def deadline_s(settings: Settings, job: Job) -> float:
    """Age past which a generation is overdue (polled slowly, slot kept)."""
    # Counted from admission too, so a job requeued by `vidq retry` gets a
    # fresh deadline when it gets a slot, not when the retry was asked.
    admitted_at = job.number("admitted_at")
    return settings.deadline_s + max(0.0, admitted_at - job.submitted_at)


def unknown_hold_s(settings: Settings, durations: DurationModel, job: Job) -> float:
    """How long, from now, the slot of a POST whose outcome is unknown stays
    taken: counted from its marker, when the generation (if any) started, so
    a job that waited for the answer first holds its slot no longer."""
    hold = generation_hold_s(settings.deadline_s, durations, job.request)
    sent_at = job.number("posting_at")
    return hold - max(0.0, job.now() - sent_at) if sent_at else hold


def generation_hold_s(deadline_s: float, durations: DurationModel, request: dict) -> float:
    """How long the slot of a generation that may be running, and that nobody
    will see end (an unknown POST's, a purged job's), stays taken."""
    # Nothing tells when it ends: its slot stays taken until all but 1 in
    # 1,000 generations would have ended, or, with nothing learned (the
    # prior may be far off), until the deadline, so the cap holds.
    plan = durations.plan(*shape_of(request))
    return plan.surprise_s if plan.surprise_s is not None else deadline_s


def poll_delay(settings: Settings, plan: PollPlan, job: Job, age_s: float) -> float:
    """Seconds until the job's next poll, at `age_s` since its submit."""
    return plan.delay(job.polls, age_s, settings.poll_min_interval_s,
                      settings.poll_max_interval_s)


def is_paid(job: Job) -> bool:
    """A generation exists: its poll or download is under way, or its submit
    got the id and has yet to hand the job on (review 133: a failure there,
    on a last attempt, freed the slot of a running generation and left its
    video unfetched)."""
    return bool(job.generation_id)


def earlier_post_unanswered(job: Job) -> bool:
    """A submit whose earlier try's POST got no answer (its marker is not the
    one this job's last try left unconfirmed): that POST may be generating."""
    return (job.step == Step.SUBMIT and not job.generation_id
            and bool(job.extra.get("posting_at"))
            and job.extra.get("posting_op") != job.extra.get("unconfirmed_op"))

