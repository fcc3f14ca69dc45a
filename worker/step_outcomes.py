"""What every step shares: its claim, the move to the next step, and what
happens when a step cannot go on: retry later, fetch a fresh result link, or
fail (outcome unknown when a POST may have been sent).

`Steps` (worker/pipeline.py) adds the steps themselves; the tasks call these
after a step raised, and decide which one by the error's class.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .admission import Admission, Dispatch, admit
from .contract import FORGOTTEN_STATUSES
from .durability import Durability
from .durations import DurationModel
from .errors import (
    CorruptVideo,
    GenerationFailed,
    RateLimited,
    ResultRefused,
    UpstreamError,
    UpstreamUnavailable,
)
from .job_rules import deadline_s, earlier_post_unanswered, is_paid, unknown_hold_s
from .jobs import OUTCOME_UNKNOWN, Job, JobStore, State, Step
from .metrics_record import failed
from .pacing import DeployedRate
from .paid_journal import PaidJournal
from .rate_limits import account_refused
from .schedule import backoff_delay
from .settings import Settings
from .storage import Storage
from .upstream import UpstreamClient

log = logging.getLogger(__name__)

# Rate limiting is the upstream saying "not now", not a fault: allow more tries.
RATE_LIMIT_ATTEMPT_FACTOR = 5
# Failed downloads of one result link before the generation is fetched again
# for a fresh one.
TRIES_PER_LINK = 2
# Status GETs in a row answered "not found", over at least VIDQ_BACKOFF_CAP_S,
# before a paid generation past its deadline gives its slot up.
NOT_FOUND_TO_GIVE_UP = 3
GENERATION_TIMEOUT = 504


@dataclass
class StepOutcomes:
    """Everything one step needs; built once per worker process."""

    settings: Settings
    store: JobStore
    admission: Admission
    client: UpstreamClient
    storage: Storage
    durations: DurationModel
    dispatch: Dispatch
    durability: Durability
    worker_name: str = "local"
    journal: PaidJournal | None = None
    submit_rate: DeployedRate = field(init=False)

    def __post_init__(self) -> None:
        self.submit_rate = DeployedRate(self.settings.max_submits_per_s)

    def claim(self, ref: str, token: str, step: str) -> Job | None:
        return self.store.claim(ref, token, self.settings.grace_s(step), self.worker_name)

    def rejected(self, job: Job, error: UpstreamError) -> None:
        """An answer that retrying cannot change, as a rule. A 401/403 to a
        POST, in a row, refuses the account: submits pause (rate_limits). For a paid
        generation, a 4xx on its status GET or result (a key being rotated, a
        gateway's or CDN's hiccup) is asked again until the hard limit: only
        the generation's own failure, or a result vidq refuses, ends it (a
        "not found" that lasts gives its slot up meanwhile: `_not_found`). A
        result URL refused is asked for again through a poll (a fresh link)."""
        if job.step == Step.SUBMIT and account_refused(
                self.store, job, error, self.settings.backoff_cap_s, self.settings.max_attempts):
            return None
        if isinstance(error, GenerationFailed):
            # Seen failed: a `retry --resubmit` has nothing to look at first
            # (lua/requeue.lua; the upstream may since have forgotten the id).
            return self.fail(job, f"{job.step}: {error}", failed_generation=job.generation_id)
        if not is_paid(job) or isinstance(error, ResultRefused):
            return self.fail(job, f"{job.step}: {error}")
        if job.step == Step.DOWNLOAD:
            return self.refresh_link(job, error)
        if job.step == Step.POLL and error.status in FORGOTTEN_STATUSES:
            return self._not_found(job, error)
        self.retry(job, error)

    def _not_found(self, job: Job, error: UpstreamError) -> None:
        """The upstream does not know the generation. Its slot, held to the
        hard limit, stalled a batch (at the provider's C = 2, two such ids
        stopped it for 24 h; a key rotated to another account makes every id
        in flight one). Only a job past its deadline (VIDQ_DEADLINE_S), told
        "not found" again and again, gives its slot up: a gateway's 404s for
        every id while they run then free no young job's slot (freed on one
        404 past the fit's 99.9th percentile, a slowdown passed C). Polls go
        on: an id that answers again takes a slot back (lua/found_again.lua),
        and its video is downloaded. A 504 ("Generation timeout") is counted
        the same way (`unavailable`)."""
        now = job.now()
        since = job.number("not_found_since") or now
        in_a_row = int(job.number("not_found")) + 1
        values: dict = {"not_found": in_a_row, "not_found_since": since}
        give_up = (not job.extra.get("slot_given_up") and in_a_row >= NOT_FOUND_TO_GIVE_UP
                   and now - since >= self.settings.backoff_cap_s
                   and now - job.submitted_at > deadline_s(self.settings, job))
        if give_up:
            log.warning("job %s: the upstream has %s generation %s for %.0f s (%s), "
                        "past its deadline: its slot is given up; polled until the hard limit",
                        job.ref, "timed out" if error.status == GENERATION_TIMEOUT else
                        "not known", job.generation_id, now - since, error)
            values.update(slot_given_up="1", release_slot=True)
        self.retry(job, error, **values)
        if give_up:
            admit(self.admission, self.dispatch)

    def unavailable(self, job: Job, error: Exception) -> None:
        """A failure worth trying again. A 504 to a poll (the contract's
        "Generation timeout") is counted as a 404 is: past the deadline,
        lasting, it gives the slot up (polls go on); retried until the hard
        limit, a generation the upstream had given up on held its slot 24 h
        (review 126)."""
        if (job.step == Step.POLL and isinstance(error, UpstreamError)
                and error.status == GENERATION_TIMEOUT):
            return self._not_found(job, error)
        self.retry(job, error)

    def refresh_link(self, job: Job, error: Exception) -> None:
        """A result URL expired: fetch the generation again for a fresh one."""
        refreshes = int(job.number("link_refreshes")) + 1
        if refreshes > self.settings.max_attempts and not self._keeps_trying(job, error):
            return self.fail(job, f"download: result link refused {refreshes} times: {error}")
        delay = backoff_delay(refreshes, self.settings.backoff_base_s, self.settings.backoff_cap_s)
        self._next(job, Step.POLL, delay, link_refreshes=refreshes, last_error=str(error),
                   polls=job.polls)

    def retry(self, job: Job, error: Exception, **values) -> None:
        if (job.step == Step.DOWNLOAD and _link_may_be_stale(error)
                and (job.attempts + 1) % TRIES_PER_LINK == 0):
            return self.refresh_link(job, error)
        delay = getattr(error, "retry_after", None)
        if delay is None:
            delay = backoff_delay(job.attempts + 1, self.settings.backoff_base_s,
                                  self.settings.backoff_cap_s)
        delay = min(delay, self.settings.backoff_cap_s)
        attempts = job.attempts + 1
        limit = self.settings.max_attempts
        if isinstance(error, RateLimited):
            limit *= RATE_LIMIT_ATTEMPT_FACTOR
        if attempts >= limit and not self._keeps_trying(job, error):
            return self.fail(job, f"{job.step}: gave up after {attempts} attempts: {error}")
        log.info("job %s: %s retry %d in %.1f s: %s", job.ref, job.step, attempts, delay, error)
        self._next(job, job.step, delay, attempts=attempts, last_error=str(error),
                   polls=job.polls, **values, **getattr(error, "carried", {}))

    def _keeps_trying(self, job: Job, error: Exception) -> bool:
        # A paid generation is polled, and its video stored, until the hard
        # limit, however many tries an outage, or a bug, costs: failing it
        # sooner would free its slot while it may still be generating. A
        # finished one's limit counts from its completion, as its link's life
        # does (about 24 h): counted from the submit, a video completing near
        # the limit was lost to a storage outage of a few minutes.
        since = job.completed_at or job.submitted_at
        return is_paid(job) and job.now() - since < self.settings.hard_limit_s

    def fail(self, job: Job, reason: str, **values) -> None:
        # Giving up (say the marker's answer was lost) while an earlier try's
        # POST may be generating: outcome unknown, its slot held.
        if not reason.startswith(OUTCOME_UNKNOWN) and earlier_post_unanswered(job):
            reason = f"{OUTCOME_UNKNOWN}: {reason}; an earlier POST of this job got no answer"
        unknown = reason.startswith(OUTCOME_UNKNOWN)
        hold = unknown_hold_s(self.settings, self.durations, job) if unknown else 0.0
        log.warning("job %s failed: %s", job.ref, reason)
        if self.store.transition(job, state=State.FAILED, release_slot=True, hold_slot_s=hold,
                                 outcome_unknown=unknown, last_error=reason,
                                 failed_at=job.now(), polls=job.polls, **values) is not None:
            job.failed, job.outcome = True, f"failed: {reason}"
            failed(job.step, reason)
            self.admission.settle(job.ref, "failed")
        admit(self.admission, self.dispatch)

    def _next(self, job: Job, step: str, delay: float, **values) -> bool:
        """Move the job to `step` in `delay` seconds; False if a newer step took it."""
        # Due by its start time plus the step grace; once a step starts, its
        # claim leases it for as long as that step may run.
        token = self.store.transition(job, next_step=step,
                                      due_in_s=delay + self.settings.step_grace_s, **values)
        if token is None:
            return self._taken_over(job)
        self.dispatch(step, job.ref, token, delay)
        job.outcome = f"{step} in {delay:.0f} s" if delay >= 1 else f"{step} next"
        return True

    @staticmethod
    def _taken_over(job: Job) -> bool:
        log.info("job %s was taken over by a newer step; this chain stops", job.ref)
        job.outcome = "taken over by a newer step"
        return False


def _link_may_be_stale(error: Exception) -> bool:
    """Whether a failed download is worth one GET for a fresh link every
    TRIES_PER_LINK tries. A host that cannot be reached may not be the one a
    fresh link names (a CDN edge gone; a resumed `vidq run --sandbox` on a new
    port); a link serving a cut or wrong object (a CDN's cached cut copy, a
    200 error page) may not be the one a fresh link serves: the same link was
    fetched until the hard limit (review 131). Not for 5xx answers: a CDN
    outage with every video waiting must not turn into a storm of status GETs."""
    if isinstance(error, CorruptVideo):
        return True
    return isinstance(error, UpstreamUnavailable) and bool(error.never_sent)
