"""The logic of each step, without Celery: submit and poll here, download in
worker/download_step.py (fail, retry and the rest of what a step may end
with: worker/step_outcomes.py).

Each method takes a claimed `Job`, talks to the upstream, writes the record
in one atomic transition and hands the next step to `dispatch`. Errors are
raised to the caller (the task), which decides between `retry` and `fail`.
Times are Redis server time (`Job.now`), the one clock every worker shares.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .admission import CAP_PROBE_FACTOR, CAP_QUIET_S, admit
from .contract import FORGOTTEN_STATUSES, shape_of
from .download_step import Downloads
from .durability import NotDurable
from .errors import RateLimited, SubmitOutcomeUnknown, UpstreamError, UpstreamUnavailable
from .generation import Generation
from .job_rules import deadline_s, poll_delay
from .jobs import Job, State, Step
from .learning import learn, tells_generation_time
from .marker import mark_posting
from .metrics_record import completed
from .pacing import post_wait_s
from .posting import NotSent, answer_may_come, answered_in_journal, post_once
from .rate_limits import pause_s, revive_refused, spread

log = logging.getLogger(__name__)

# A POST marker Redis could not make durable (its wait timed out): tried again
# this much later.
MARKER_RETRY_S = 5.0
# A marked job whose POST may still answer: looked at again this much later.
ANSWER_RECHECK_S = 5.0


class Steps(Downloads):
    """Submit, poll and download: each takes a claimed job and ends by moving
    it on (`_next`) or raising to its task."""

    def submit(self, job: Job) -> None:
        if job.generation_id:
            # Requeued or recovered: the generation exists; look at it now.
            self._next(job, Step.POLL, self.settings.poll_min_interval_s, attempts=0)
            return
        # A marker means a POST may have gone out: the marker decides (outcome
        # unknown, slot held), not a storage check that may fail and retry.
        if not job.extra.get("posting_at") and self._not_posting_now(job):
            return
        try:
            marker = mark_posting(self.store, job, self.durability,
                                  self.settings.marker_patience_s)
        except NotDurable as exc:
            # Nothing was sent, and the marker is cleared. Redis cannot make it
            # durable now (a replica lagging, an fsync stalled): no fault of the
            # job's, so it keeps its slot and tries again shortly, spending no
            # attempt. Taken over while this worker stood still, the job was
            # failed "outcome unknown" for its marker: revived.
            log.warning("job %s: not POSTed yet: %s", job.ref, exc)
            if not self._next(job, Step.SUBMIT, MARKER_RETRY_S, **exc.carried) and exc.mine:
                revive_refused(self.store, self.admission, self.dispatch, job,
                               NotSent(f"not sent: {exc}"))
            return
        if marker == "stale":
            return
        if marker in ("has_id", "posted_before"):
            return self._marked_before(job, marker)
        try:
            generation = post_once(self.client, self.store, job, self.settings, lambda error:
                                   revive_refused(self.store, self.admission, self.dispatch,
                                                  job, error), self.durability, self.journal)
        except RateLimited as exc:
            return self._rate_limited_submit(job, exc)
        generation.raise_if_failed()
        plan = self.durations.plan(*shape_of(job.request))
        delay = poll_delay(self.settings, plan, job, 0.0)
        # Which plan aimed it: a job aimed by no fit, or by one for slower
        # times, finishing late is no news of a slowdown (schedule.mark_late).
        self._next(job, Step.POLL, delay, attempts=0, first_aim=delay,
                   aimed_second=plan.second_s or 0.0)

    def _not_posting_now(self, job: Job) -> bool:
        """Whether an unmarked submit ends here, moved on, before its POST:
        done already, cancelled, paused or paced."""
        if self._finished_since(job) or self._already_stored(job):
            return True
        if self.admission.cancelled(job.batch):
            # Cancelled between admission and POST: never sent (it ends cancelled).
            self.store.back_in_line(job, 0.0, rate_limited=False)
            return True
        if job.number("__submit_pause_ms") > 0:
            # Admitted just before a 429 paused submits: back to the front of
            # the line. (Not a recovered submit whose POST may have been sent:
            # it must end outcome unknown, never be POSTed again.)
            self.store.back_in_line(job, 0.0, rate_limited=False)
            return True
        rate = self.submit_rate.get(self.store.redis)
        if wait := post_wait_s(self.store, job, rate, self.settings.max_in_flight):
            # The upstream limits POSTs per second: this one's turn comes later.
            self._next(job, Step.SUBMIT, wait)
            return True
        return False

    def _marked_before(self, job: Job, marker: str) -> None:
        """A marker found with an id, or from a POST started earlier: the job
        moves on without a POST, or ends "outcome unknown" (raised)."""
        if marker == "has_id":
            job.generation_id = self.store.get(job.ref).generation_id  # type: ignore[union-attr]
            self._next(job, Step.POLL, self.settings.poll_min_interval_s, attempts=0)
            return
        if answer_may_come(self.store, job, self.settings.post_deadline_s,
                           self.settings.heartbeat_ttl_s):
            # Its POST is still on the wire, or Redis lost its answer's
            # record (restarted from an older state) and the POST thread
            # records it again: not unknown yet. Slot kept, nothing sent.
            self._next(job, Step.SUBMIT, ANSWER_RECHECK_S)
            return
        if generation_id := answered_in_journal(self.store, job,
                                                Path(self.settings.journal_dir),
                                                self.durability):
            # Polled now, as a marker found with its id is: the claim
            # still holds the step, so nothing else would for a step grace.
            job.generation_id = generation_id
            self._next(job, Step.POLL, self.settings.poll_min_interval_s, attempts=0)
            return
        raise SubmitOutcomeUnknown(
            "a POST for this job was started earlier and its answer never arrived "
            "(a worker or Redis died mid-POST); not re-sent, to avoid paying twice")

    def _finished_since(self, job: Job) -> bool:
        """`vidq retry --resubmit` retired a generation nobody saw finish (it
        failed at the hard limit, say). If it has finished since, its video is
        paid for: it becomes the job's generation again, downloaded, and
        nothing is POSTed. So does one still running short of the hard limit
        (raised since, say): a new POST would pay twice, pass C, and leave the
        first video unfetched (review 116). (Checked before every POST of the
        job: one that waited in line after a 429 looks again.) Only its
        failure, or a pending or unknown (404, 410) one past the hard limit,
        lets the POST go; a 404 short of it is polled (a gateway's one 404
        paid twice; review 119), any other failure retried: neither POSTs.
        True when the job moved on without a POST: adopted, or waiting out
        the account's pause on status GETs (a 429 to this look is one, for
        every worker, and spends no attempt)."""
        earlier = job.extra.get("check_before_post")
        if not earlier:
            return False
        if (paused_ms := job.number("__poll_pause_ms")) > 0:
            self._look_later(job, paused_ms / 1000)
            return True
        try:
            status = self._status_of(earlier)
        except RateLimited as exc:
            self._look_later(job, self._pause_polls(exc))
            return True
        age = job.now() - job.submitted_at
        if status == "failed" or (status != "completed" and age >= self.settings.hard_limit_s):
            log.info("job %s: earlier generation %s %s after %.0f s: POSTing", job.ref, earlier,
                     status, age)
            return False
        log.warning("job %s: earlier generation %s %s: polled again, no new POST", job.ref,
                    earlier, "finished after all" if status == "completed"
                    else f"{status} after {age:.0f} s, short of the hard limit")
        # Paid when its job failed (lua/settle.lua): this admission's commitment
        # is released, not spent a second time.
        self.admission.settle(job.ref, "adopted")
        job.generation_id = earlier
        self._next(job, Step.POLL, 0.0, state=State.SUBMITTED, attempts=0,
                   generation_id=earlier, check_before_post="")
        return True

    def _status_of(self, generation_id: str) -> str:
        """'completed', 'failed', 'not known' (404, 410) or the pending status."""
        try:
            generation = self.client.fetch(generation_id)
        except RateLimited:
            raise
        except UpstreamError as exc:
            if exc.status in FORGOTTEN_STATUSES:
                return "not known"
            # A 401/403 (a key being rotated) or a 5xx says nothing of it.
            raise UpstreamUnavailable(f"earlier generation {generation_id} not checked yet "
                                      f"({exc}): no new POST before it is") from None
        if generation.succeeded:
            return "completed"
        return "failed" if generation.failed else f"still {generation.status!r}"

    def _pause_polls(self, error: RateLimited) -> float:
        pause = pause_s(error)
        self.store.pause_polls(pause)
        log.warning("429 on a status GET: polls paused %.0f s for every worker", pause)
        return pause

    def _resume_delay(self, pause_s: float) -> float:
        # Spread, so paused polls do not resume all at once; a pause longer
        # than the longest countdown (kept under the broker's visibility
        # timeout) is waited out in several, each finding the pause still on.
        return min(pause_s + spread(pause_s), self.settings.poll_max_interval_s)

    def _after_poll_pause(self, job: Job, pause_s: float) -> None:
        # A first poll held back finds its video "done by then" late: no news
        # of the generation time (learning.tells_generation_time).
        held = {"held_back": "1"} if job.polls == 0 else {}
        self._next(job, Step.POLL, self._resume_delay(pause_s), polls=job.polls, **held)

    def _look_later(self, job: Job, pause_s: float) -> None:
        # Its slot stays held: the look may find the video, and a POST follows
        # at once if not.
        self._next(job, Step.SUBMIT, self._resume_delay(pause_s))

    def _rate_limited_submit(self, job: Job, error: RateLimited) -> None:
        """A 429 is about the account: every worker pauses submits, this job
        keeps its place at the front of the line, and no attempt is spent."""
        pause = pause_s(error)
        effective = self.store.back_in_line(job, pause, rate_limited=True)
        log.warning("429 on submit: submits paused %.0f s for every worker; effective C %d",
                    pause, effective)

    def poll(self, job: Job) -> None:
        if not job.generation_id:
            # A poll message met a job with no id to poll: once everysec lost
            # a second, the token counter went back and a number issued again
            # matched a message from before the crash. Polled, the upstream
            # answered 400 and the paid job failed while its answer was being
            # recorded again (a CI run). Stale: its lease runs out and the
            # reconciler sends the step the record says.
            log.warning("job %s: a poll with no generation id to poll: stale, left", job.ref)
            return None
        paused_ms = job.number("__poll_pause_ms")
        if paused_ms > 0:
            return self._after_poll_pause(job, paused_ms / 1000)
        try:
            generation = self.client.fetch(job.generation_id)
        except RateLimited as exc:
            return self._after_poll_pause(job, self._pause_polls(exc))
        job.polls += 1
        if job.extra.get("not_found"):
            self.store.found_again(job, running=generation.pending)
        if generation.succeeded:
            return self._completed(job, generation)
        generation.raise_if_failed()
        age = job.now() - job.submitted_at
        if age >= self.settings.hard_limit_s:
            return self.fail(job, f"timeout: still {generation.status!r} after "
                                  f"{age:.0f} s (hard limit); generation id kept")
        if age >= deadline_s(self.settings, job):
            # Paid for and maybe still coming: look slowly, keep the slot.
            slowly = min(self.settings.overdue_poll_interval_s, self.settings.poll_max_interval_s)
            self._next(job, Step.POLL, slowly,
                       state=State.OVERDUE, polls=job.polls, attempts=0)
            return
        delay = poll_delay(self.settings, self.durations.plan(*shape_of(job.request)), job, age)
        self._next(job, Step.POLL, delay, state=State.GENERATING,
                   polls=job.polls, attempts=0, last_poll_age=age)

    def _completed(self, job: Job, generation: Generation) -> None:
        values: dict = {"video_url": generation.video_url, "polls": job.polls, "attempts": 0}
        if generation.credits_used is not None:
            values["credits_used"] = generation.credits_used
        first_seen = not job.completed_at
        if first_seen:
            values["completed_at"] = job.now()
            # Finished after the previous poll (none: censored at 0) and by this one.
            age = job.now() - job.submitted_at
            previous = job.number("last_poll_age") if job.polls > 1 else 0.0
        # The generation is done and paid whatever happens next: settle before
        # the transition, so a worker killed between them leaves no commitment
        # counted for good (a redelivered poll settles again as a no-op).
        self.admission.settle(job.ref, "done", generation.credits_used)
        moved = self._next(job, Step.DOWNLOAD, 0.0, state=State.DOWNLOADING, release_slot=True,
                           **values)
        if first_seen and moved:
            # Counted and learned once the transition holds: a poll retried
            # because its transition was lost must not count it twice. A
            # recovered chain's delays say nothing about the upstream.
            if not job.extra.get("recovered"):
                completed(*shape_of(job.request), job.polls, previous, age)
            if tells_generation_time(job, age, deadline_s(self.settings, job)):
                learn(self.durations, self.store, self.dispatch, self.settings, job,
                      previous, age)
        self.store.grow_cap(CAP_PROBE_FACTOR, CAP_QUIET_S, completed=True)
        admit(self.admission, self.dispatch)
