"""One POST of a job, bounded by a deadline, whose answer is never lost.

The POST runs in a thread that records the generation id the moment the
upstream answers, even after the step gave up waiting (VIDQ_POST_DEADLINE_S):
a late id revives the job, and the generation it names is polled and
downloaded. Recording retries through a Redis outage, because the id of a
paid generation is the one thing that must not be dropped; the answer is
journaled on the worker's disk first (worker/paid_journal.py), so a process
stopped before Redis has it loses nothing. Where Redis answers before its disk
has the write (appendfsync everysec), the id is recorded again if Redis
restarted within durability.SETTLE_S, before the journal lets it go. A late answer
that proves nothing was created (a 429, a 503, a 4xx) is handed back
instead, if the marker it clears is its own attempt's (worker/rate_limits.py:
a 429 or 503 is POSTed again, a 4xx fails with the upstream's reason). A
worker process stopping waits for the answers still due.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis
from celery.signals import worker_process_shutdown

from . import keys
from .contract import ACCOUNT_STATUSES
from .durability import Durability, NotDurable, same_run_after, settling_run
from .errors import (
    RequestRejected,
    RetryableUpstreamError,
    SubmitOutcomeUnknown,
    UpstreamError,
    UpstreamUnavailable,
)
from .generation import Generation
from .jobs import Job, JobStore, load_script
from .leases import renewed
from .paid_journal import PaidJournal, replay_now
from .settings import Settings
from .upstream import UpstreamClient
from .upstream_errors import SUBMIT_RETRY_STATUSES

log = logging.getLogger(__name__)

RECORD_RETRY_S = (0.2, 1.0, 2.0, 5.0)
JOURNAL_WAIT_S = 1.0


# POSTs whose answer may still come: a process shutting down waits for them.
_POSTING: set[threading.Thread] = set()
SHUTDOWN_WAIT_S = 60.0  # past the read timeout, and a few retries of the record
OPEN_POST_LEASE_S = 30.0  # renewed every 10 s while the answer is read


class NotSent(UpstreamUnavailable):
    """A POST withheld: its worker stood still (SIGSTOP, a paused VM) between
    the marker and the send, and another worker took the job over: it found
    the marker and failed the job "outcome unknown", its slot held only so
    long. Sent now, the POST could pass C. Nothing was sent, so the job is
    revived (`refused_late`) or retried."""


def answered(store: JobStore, submit: Callable[[dict], Generation], request: dict) -> Generation:
    """`submit(request)`, counting 401/403 answers in a row for the account
    (rate_limits.account_refused); another 4xx ends the run (an accepted POST
    ends it in lua/record_generation.lua). A 429, a 408 or a 5xx says nothing
    of the account and leaves the count: with the credits gone, a rate-limit
    429 now and then must not fail two more prompts each time."""
    try:
        return submit(request)
    except UpstreamError as exc:
        if exc.status in ACCOUNT_STATUSES:
            with contextlib.suppress(redis.RedisError):  # a count, never a reason to fail
                pipe = store.redis.pipeline(transaction=False)
                pipe.incr(keys.ACCOUNT_REFUSALS)
                pipe.expire(keys.ACCOUNT_REFUSALS, 86400)
                pipe.execute()
        elif exc.status is not None and exc.status < 500 \
                and exc.status not in SUBMIT_RETRY_STATUSES:
            with contextlib.suppress(redis.RedisError):
                store.redis.delete(keys.ACCOUNT_REFUSALS)
        raise


def post_once(client: UpstreamClient, store: JobStore, job: Job, settings: Settings,
              refused_late: Callable[[UpstreamError], None] | None = None,
              durability: Durability | None = None,
              journal: PaidJournal | None = None) -> Generation:
    """POST `job` once; its generation id is recorded before this returns. An
    answer that proves nothing was created (a 429, a 503, a 4xx) but comes after the
    step gave up is handed to `refused_late`: the job failed "outcome
    unknown", and now it is known."""
    outcome: dict = {}
    lock, done = threading.Lock(), threading.Event()

    def settle(**answer) -> bool:
        """Hand the answer to the step; True if the step already gave up."""
        with lock:
            late = outcome.get("gave_up", False)
            outcome.update(answer)
            done.set()
        return late

    def post() -> None:
        try:
            # On the wire until Redis surely has the id: `vidq purge` waits.
            with on_the_wire(store, job, settings.heartbeat_ttl_s) as still_ours:
                try:
                    if not still_ours():
                        raise NotSent("not sent: this worker stood still after its POST "
                                      "marker, and the job was (or may be) taken over")
                    generation = answered(store, client.submit, job.request)
                except (RetryableUpstreamError, RequestRejected) as exc:
                    mine = store.clear_posting(job)  # this attempt surely created nothing
                    late = settle(error=exc)
                    if (late or isinstance(exc, NotSent)) and mine and refused_late:
                        refused_late(exc)
                    return
                # Not written into `job`: a step that gave up must fail as one that
                # saw no id (lua/transition.lua then leaves a paid job to its poll).
                journaled = _journal_paid(journal, job, generation.id)
                record_paid(store, job, generation.id, settings.step_grace_s, durability,
                            lambda recorded: settle(generation=generation,
                                                    generation_id=recorded))
                if journal is not None and journaled.is_set():
                    _journal_recorded(journal, job, generation.id)
        except BaseException as exc:  # handed to the waiting step, or logged if it left
            if done.is_set():
                log.exception("job %s: a late answer to its POST could not be handled", job.ref)
            else:
                settle(error=exc)
        finally:
            _POSTING.discard(threading.current_thread())

    thread = threading.Thread(target=post, name=f"post {job.ref}", daemon=True)
    _POSTING.add(thread)
    thread.start()
    done.wait(settings.post_deadline_s)
    with lock:
        outcome["gave_up"] = not done.is_set()
    if outcome["gave_up"]:
        raise SubmitOutcomeUnknown(
            f"no complete answer to the POST within {settings.post_deadline_s:.0f} s; "
            "not re-sent (a late answer is still recorded)")
    error = outcome.get("error")
    if error is not None:
        raise error
    job.generation_id = outcome["generation_id"]
    # As record_generation stamped it in Redis: a resubmitted job still held
    # its retired generation's here, and a failure of this step measured the
    # new generation's hard limit from it (review 134).
    job.submitted_at = job.now()
    log.info("job %s submitted as generation %s", job.ref, job.generation_id)
    return outcome["generation"]


def _journal_paid(journal: PaidJournal | None, job: Job, generation_id: str) -> threading.Event:
    """Journal a POST's answer (worker/paid_journal.py), set once it is on
    disk. Waited for at most JOURNAL_WAIT_S: a stalled disk must not keep the
    id from Redis, and a full or read-only one is logged, never fatal."""
    written = threading.Event()
    if journal is None:
        return written

    def write() -> None:
        try:
            journal.paid(job, generation_id)
            written.set()
        except OSError as exc:
            log.error("job %s: generation %s not journaled in %s (%s): until Redis has it, "
                      "only this process holds it", job.ref, generation_id,
                      journal.directory, exc)

    thread = threading.Thread(target=write, name=f"journal {job.ref}", daemon=True)
    thread.start()
    thread.join(JOURNAL_WAIT_S)
    if thread.is_alive():
        log.warning("job %s: the journal in %s is slow (over %.0f s); Redis is told first",
                    job.ref, journal.directory, JOURNAL_WAIT_S)
    return written


def _journal_recorded(journal: PaidJournal, job: Job, generation_id: str) -> None:
    try:
        journal.recorded(generation_id)
    except OSError as exc:  # replayed once this process is gone: the same id again is nothing
        log.warning("job %s: generation %s is in Redis; the journal in %s could not say so "
                    "(%s)", job.ref, generation_id, journal.directory, exc)


@worker_process_shutdown.connect
def _wait_for_late_answers(**_kwargs) -> None:
    """A POST's answer may come after its step gave up: a late id is a paid
    video, a late 429 a job to revive. A process stopping waits for them."""
    waiting = list(_POSTING)
    if waiting:
        log.warning("stopping: waiting up to %.0f s for the answer to %d POST(s)",
                    SHUTDOWN_WAIT_S, len(waiting))
    deadline = time.monotonic() + SHUTDOWN_WAIT_S
    for thread in waiting:
        thread.join(max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def on_the_wire(store: JobStore, job: Job,
                fresh_s: float) -> Iterator[Callable[[], bool]]:
    """Announce the POST while its answer may come (`lua/open_post.lua`):
    `vidq purge` waits for it, however long the answer takes. Yields a check
    to make right before sending: False if the job is no longer this step's,
    or if more than `fresh_s` (the heartbeat's life: then others may act)
    passed since it was asked. Best effort: a Redis error never holds a POST
    back; the entry expires with its lease."""
    script = load_script(store.redis, "open_post")
    script_keys = [keys.batch_open_posts(job.batch), keys.job(job.ref)]
    lease_ms = int(OPEN_POST_LEASE_S * 1000)
    # One entry per POST (its marker's call id): a re-POST of the job while an
    # earlier POST's answer trickles in must not end the earlier one's entry.
    entry = f"{job.ref}#{job.extra.get('posting_op', '')}"

    def mark(on: bool, token: str = "") -> bool:
        return bool(script(keys=script_keys, args=[entry, lease_ms, int(on), token]))

    asked = time.monotonic()  # before: the process may stop while the answer comes
    try:
        ours = mark(True, job.token)
    except redis.RedisError:
        ours = True  # cannot tell: sent, as it would be without this check

    def still_ours() -> bool:
        return ours and time.monotonic() - asked <= fresh_s

    try:
        with renewed(lambda: mark(True), OPEN_POST_LEASE_S, f"open POST of {job.ref}"):
            yield still_ours
    finally:
        with contextlib.suppress(redis.RedisError):
            mark(False)


def answer_may_come(store: JobStore, job: Job, post_deadline_s: float,
                    heartbeat_ttl_s: float) -> bool:
    """Whether the POST behind the job's marker may still answer, for a step
    waiting no longer than its own POST would (`post_deadline_s` from the
    marker): its sender (`posting_by`) beats, so its thread still reads or
    records the answer (a Redis restored from just after the marker has no
    entry on the wire yet), or its entry on the wire is live (a sender cut
    off from Redis for a few seconds misses its heartbeat). A Redis started
    less than a heartbeat's lifetime ago may not have heard a live sender's
    beat yet (one restored from its disk drops the beats that expired while it
    was down). A pool child's death clears both (lua/step_lost.lua)."""
    if job.now() - job.number("posting_at") >= post_deadline_s:
        return False
    sender = job.extra.get("posting_by") or ""
    pipe = store.redis.pipeline(transaction=False)
    pipe.zscore(keys.batch_open_posts(job.batch), f"{job.ref}#{job.extra.get('posting_op', '')}")
    pipe.exists(keys.worker_alive(sender))
    until_ms, beats = pipe.execute()
    return (bool(sender and (beats or _younger_than(store.redis, heartbeat_ttl_s)))
            or (until_ms is not None and until_ms > job.now() * 1000))


def _younger_than(client: redis.Redis, seconds: float) -> bool:
    """Whether Redis started less than `seconds` ago (whole seconds: a young
    Redis may be taken for one up to a second younger than it is). Its uptime
    follows its wall clock: negative after a step back, which proves nothing."""
    try:
        return 0 <= int(client.info("server")["uptime_in_seconds"]) < seconds
    except (redis.ResponseError, KeyError, ValueError):  # INFO renamed or cut by a proxy
        return False


def answered_in_journal(store: JobStore, job: Job, directory: Path,
                        durability: Durability | None) -> str:
    """The generation id the job's POST got, if it was in a dead process's
    journal on this machine (a pool child killed while its worker could not
    reach Redis; review 103): recorded from there, the job is not "outcome
    unknown". "" if not."""
    if not replay_now(directory, store, durability):
        return ""
    recorded = store.get(job.ref)
    return recorded.generation_id if recorded else ""


def record_paid(store: JobStore, job: Job, generation_id: str, lease_s: float,
                durability: Durability | None, recorded: Callable[[str], object]) -> None:
    """Store a paid generation id, durably, through a Redis outage or a
    failover if need be: until then this process holds the only copy.
    `recorded(id)` is called once Redis has it, durable or not yet: polling
    it is harmless, and the step must not wait for a lagging replica."""
    handed = False
    for pause in (*RECORD_RETRY_S, *([10.0] * 360)):
        try:
            run = settling_run(store.redis, durability)
            answer = store.record_generation(job, generation_id, lease_s, durability)
            if not handed:
                handed = True
                recorded(answer)
            if not run or same_run_after(store.redis, run):
                return
            log.warning("job %s: Redis restarted before generation %s reached its disk "
                        "(appendfsync everysec, or no AOF): recording it again", job.ref,
                        generation_id)
            continue
        except NotDurable as exc:  # the script ran: the id is there, not yet durable
            if not handed:
                handed = True
                recorded(exc.answer)
            log.warning("job %s: generation %s recorded, not yet durable (%s); recording "
                        "it again", job.ref, generation_id, exc)
        except Exception as exc:
            log.error("job %s: generation %s %s (%s); recording it again", job.ref,
                      generation_id, "not confirmed on disk yet" if handed else
                      "not recorded yet", exc)
        time.sleep(pause)
    if not handed:
        raise RuntimeError(f"generation {generation_id} of {job.ref} could not be recorded")
    log.error("job %s: generation %s recorded but never confirmed durable", job.ref,
              generation_id)
