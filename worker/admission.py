"""Admission: who may hold one of the upstream's C slots.

Each batch's jobs wait in its own line (`lua/line_lib.lua`); nothing is
published for them until a slot is free. `pump` moves jobs into the slot set
while fewer than C are held, higher priorities first and batches of one
priority round-robin, within the spend caps, and only then does a submit task
exist for them. C is one value per
deployment, kept in Redis (`vidq:config`): the workers write theirs when they
start (or `vidq cap N`), and the pump script reads it, so a producer's shell
can never admit more than the workers are configured for. A slot is freed
when its generation reaches a terminal status, so at most C generations are
in flight upstream, across every worker process and machine. Recovering
the steps of a worker that died is worker/recovery.py's.
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator

import redis

from . import keys
from .batch_changes import (
    EnqueueInterrupted,
    being_purged,
    lock_lapsed,
    purged_meanwhile,
    purged_while_enqueued,
)
from .connection import op_id, run_pipeline
from .contract import shape_of
from .errors import InputError
from .jobs import JobStore, Step, load_script
from .leases import Fence
from .spend import SPEND_TTL_S, CreditEstimates

log = logging.getLogger(__name__)

Dispatch = Callable[[str, str, str, float], None]  # (step, ref, token, countdown)
ENQUEUE_PIPELINE = 2000
# The effective cap (lowered after 429s) grows by one after this many times
# itself in clean completions, or after this long without a 429.
CAP_PROBE_FACTOR, CAP_QUIET_S = 2, 30.0
# A hold kept because an older job still runs is looked at again after this.
HOLD_RECHECK_S = 5.0
# Highest first: the pump serves a lower priority only when the higher are empty.
PRIORITIES = ("high", "normal", "low")
LINE_SCRIPTS = ("pump", "enqueue", "requeue", "settle", "batch_settings", "cancel")


class Admission:
    """The global slot pool and the batches' waiting lines."""

    def __init__(self, store: JobStore, step_grace_s: float,
                 credits: CreditEstimates | None = None, longest_hold_s: float = 1000.0,
                 longest_look_s: float = 86400.0):
        self.store = store
        self.redis: redis.Redis = store.redis
        self.step_grace_s = step_grace_s
        self.longest_hold_s = longest_hold_s  # VIDQ_DEADLINE_S (lua/release_holds.lua)
        self.longest_look_s = longest_look_s  # VIDQ_HARD_LIMIT_S (lua/release_holds.lua)
        self.credits = credits or CreditEstimates()
        self._scripts = {name: load_script(self.redis, name, ("line_lib",))
                         for name in LINE_SCRIPTS}
        self._scripts["release_holds"] = load_script(self.redis, "release_holds")
        self._scripts["set_cap"] = load_script(self.redis, "set_cap")
        self._scripts["set_estimates"] = load_script(self.redis, "set_estimates")

    def set_cap(self, max_in_flight: int, by_operator: bool = False) -> tuple[int | None, bool]:
        """Store C (see `lua/set_cap.lua`): an operator's, or a starting
        worker's VIDQ_MAX_IN_FLIGHT, which leaves an operator's C standing
        unless the deployment's own value changed. Returns the value stored
        before, and whether it was kept."""
        old, outcome = self._scripts["set_cap"](keys=[keys.CONFIG],
                                                args=[max_in_flight, int(by_operator)])
        return (int(old) if old else None), outcome == "kept"

    def publish_estimates(self, estimates: CreditEstimates) -> None:
        """The deployment's credit estimates, for the pump (lua/set_estimates.lua)."""
        args: list[str] = [repr(estimates.default)]
        for (model, resolution), credits in sorted(estimates.table.items()):
            args += [f"{model}@{resolution}", repr(credits)]
        self._scripts["set_estimates"](keys=[keys.CONFIG], args=args)

    def cap(self) -> int | None:
        raw = self.redis.hget(keys.CONFIG, "max_in_flight")
        return int(raw) if raw else None

    def effective_cap(self) -> int | None:
        """C as lowered after 429s showed the account's real limit; None if not lowered."""
        configured = self.cap()
        raw = self.redis.hget(keys.CONFIG, "effective_cap")
        if not raw or configured is None or int(raw) >= configured:
            return None
        return int(raw)

    def existing_requests(self, batch: str, job_ids: list[str]) -> dict[str, dict]:
        """The stored request of each id that already has a job in `batch`."""
        found: dict[str, dict] = {}
        for start in range(0, len(job_ids), 5000):
            chunk = job_ids[start:start + 5000]
            pipe = self.redis.pipeline(transaction=False)
            for job_id in chunk:
                pipe.hget(keys.job(keys.job_ref(batch, job_id)), "request")
            for job_id, raw in zip(chunk, pipe.execute(), strict=True):
                if raw:
                    found[job_id] = json.loads(raw)
        return found

    def enqueue(self, batch: str, jobs: Iterable[tuple[str, dict] | tuple[str, dict, dict]],
                now: float, batch_settings: dict | None = None,
                fence: Fence | None = None) -> int:
        """Write new jobs and put them in line; existing ids are left alone.
        A job may carry a third element, extra hash fields (e.g. its input
        `line`), written only where the job does not have them yet.
        `batch_settings` (priority, max_credits, max_videos) apply first.
        With a `fence`, each write needs its lock still held."""
        self.refuse_if_cancelled(batch)
        if fence is not None and not fence.held(self.redis):
            raise lock_lapsed(batch, 0)
        self.configure(batch, batch_settings or {}, defaults={"priority": "normal"})
        # Known before its first job is: an enqueue that dies half-way leaves
        # jobs that run, and their batch must be listed, finished and expired.
        self.redis.sadd(keys.BATCHES, batch)
        self.redis.hsetnx(keys.batch(batch), "created_at", repr(now))
        created = refused = 0
        try:
            for answers in self._enqueue_chunks(batch, jobs, now, fence):
                created += answers.count(1)
                refused += answers.count(-1)
        except KeyboardInterrupt:
            raise EnqueueInterrupted(batch, created) from None
        except redis.RedisError as exc:
            if "VIDQ_LOCK_LOST" in str(exc):
                raise lock_lapsed(batch, created) from None
            raise type(exc)(f"{exc}; at least {created} new jobs had been written to batch "
                            f"{batch!r} and will run; the same command again enqueues the "
                            "rest (nothing twice)") from exc
        if self.cancelled(batch):  # `vidq cancel` ran meanwhile (lua/enqueue.lua)
            raise InputError(f"batch {batch!r} was cancelled while this enqueue ran: "
                             f"{created} jobs were written before (cancelled with it unless "
                             "admitted already), the rest were not enqueued")
        if self.purging(batch):
            raise InputError(being_purged(batch, f"{created} jobs were written before it "
                                                 "began (purged with it), the rest were not "
                                                 "enqueued"))
        if refused:  # marked cancelled or purging, and purged since (lua/enqueue.lua)
            raise purged_while_enqueued(batch, created, refused)
        return created

    def _enqueue_chunks(self, batch: str, jobs: Iterable, now: float,
                        fence: Fence | None) -> Iterator[list[int]]:
        """lua/enqueue.lua's answers, a pipeline at a time: 1 written, 0 there
        already, -1 refused (the batch cancelled or being purged)."""
        calls = []
        for job_id, request, *rest in jobs:
            calls.append(self._enqueue_call(batch, job_id, request, rest, now, fence))
            if len(calls) >= ENQUEUE_PIPELINE:
                yield [int(answer) for answer in self._run_all("enqueue", calls)]
                calls = []
        if calls:
            yield [int(answer) for answer in self._run_all("enqueue", calls)]

    def _enqueue_call(self, batch: str, job_id: str, request: dict, rest: list,
                      now: float, fence: Fence | None) -> tuple[list[str], list[str]]:
        ref = keys.job_ref(batch, job_id)
        script_keys = [keys.job(ref), keys.batch_jobs(batch), keys.batch_counts(batch),
                       keys.batch(batch)] + ([fence.key] if fence else [])
        args = [job_id, batch, json.dumps(request, ensure_ascii=False), repr(now),
                repr(self.credits.of(request)), fence.token if fence else ""]
        extra = {"shape": "@".join(shape_of(request)), **(rest[0] if rest else {})}
        for name, value in extra.items():
            args += [name, str(value)]
        return script_keys, args

    def configure(self, batch: str, values: dict, defaults: dict | None = None,
                  existing: bool = False) -> bool:
        """Set a batch's admission settings (priority, paused, max_credits,
        max_videos; None removes one) and lift a spend-cap hold; `defaults`
        only where unset. `existing`: only if the batch still has jobs, else
        InputError (a purge ended since the caller's check). Returns whether
        the batch waits in a ring now."""
        fields = {name: value for name, value in (defaults or {}).items()
                  if not self.redis.hexists(keys.batch(batch), name)}
        fields.update(values)
        args: list[str] = [batch, "1" if existing else ""]
        for name, value in fields.items():
            args += [name, "" if value is None else str(value)]
        answer = int(self._scripts["batch_settings"](keys=[keys.batch(batch)], args=args))
        if answer < 0:
            raise purged_meanwhile(batch, "nothing changed")
        return answer == 1

    def requeue_failed(self, batch: str, resubmit_unknown: bool = False,
                       job_ids: list[str] | None = None, resubmit: bool = False,
                       include_completed: bool = False) -> dict[str, int]:
        """Put a batch's failed jobs (or those of `job_ids`) back in their
        batch's line at their enqueue position, one atomic script each. A job
        with a generation id takes a slot and polls it again at once (a late
        video is downloaded, even in a cancelled batch), unless `resubmit`
        (a new generation for every job whose generation did not finish, and
        for those too if `include_completed`); one whose POST has an unknown
        outcome is re-POSTed only if asked."""
        answers: dict[str, int] = {}
        ids = self.store.job_ids(batch) if job_ids is None else job_ids
        op = op_id()  # one per call: each job's script answers its re-send
        for start in range(0, len(ids), ENQUEUE_PIPELINE):
            calls = [([keys.job(keys.job_ref(batch, job_id)), keys.batch_counts(batch),
                       keys.batch_unknown(batch), keys.SLOT_HOLDS, keys.SLOTS, keys.DUE],
                      [keys.job_ref(batch, job_id), job_id, "1" if resubmit_unknown else "0", op,
                       "1" if resubmit else "0", "1" if include_completed else "0"])
                     for job_id in ids[start:start + ENQUEUE_PIPELINE]]
            for answer in self._run_all("requeue", calls):
                answers[answer] = answers.get(answer, 0) + 1
        return answers

    def _run_all(self, script: str, calls: list[tuple[list, list]]) -> list:
        """One pipeline of `script` calls, each (keys, args)."""
        def build(pipe) -> None:
            for call_keys, args in calls:
                self._scripts[script](keys=call_keys, args=args, client=pipe)
        return run_pipeline(self.redis, build)

    def pump(self) -> list[tuple[str, str]]:
        """Admit waiting jobs into free slots; returns (ref, token) to submit."""
        moved, *flat = self._scripts["pump"](
            keys=[keys.SLOTS, keys.DUE, keys.SEQ, keys.CONFIG, keys.PAUSE_SUBMIT,
                  keys.ADMISSION, keys.PUMP_REPLAY],
            args=[repr(self.step_grace_s), repr(self.credits.default), SPEND_TTL_S,
                  op_id(), *PRIORITIES])
        if moved:
            log.warning("moved %d jobs from the old single line (%s) into their batches' "
                        "lines", moved, keys.ADMISSION)
        return list(zip(flat[::2], flat[1::2], strict=True))

    def settle(self, ref: str, outcome: str, credits_used: float | None = None) -> bool:
        """A generation ended ('done', 'failed' or 'stored'): its committed
        credits become spent ones (lua/settle.lua); once per admission
        ('adopted' first, for an earlier generation taken back)."""
        reported = "" if credits_used is None else repr(credits_used)
        return bool(self._scripts["settle"](keys=[keys.job(ref)], args=[outcome, reported]))

    def cancelled(self, batch: str) -> bool:
        return self.redis.hget(keys.batch(batch), "cancelled") == "1"

    def purging(self, batch: str) -> bool:
        return self.redis.hexists(keys.batch(batch), "purging")

    def refuse_if_cancelled(self, batch: str) -> None:
        """A cancelled batch takes no new jobs, nor one being purged."""
        if self.cancelled(batch):
            raise InputError(f"batch {batch!r} was cancelled: enqueue into a new batch name")
        if self.purging(batch):
            raise InputError(being_purged(batch, "nothing enqueued"))

    def cancel_waiting(self, batch: str, limit: int) -> tuple[int, int]:
        """Mark `batch` cancelled and end up to `limit` of its waiting jobs
        `cancelled`; returns (taken from its line, ended)."""
        taken, ended = self._scripts["cancel"](
            keys=[keys.batch(batch), keys.batch_line(batch), keys.batch_counts(batch),
                  keys.SLOTS, keys.DUE],
            args=[batch, limit, op_id()])
        if int(taken) < 0:
            raise purged_meanwhile(batch, "nothing cancelled")
        return int(taken), int(ended)

    def release_expired_holds(self, recheck_s: float = HOLD_RECHECK_S) -> int:
        """Free the slots of expired holds (see lua/release_holds.lua); returns how many."""
        return int(self._scripts["release_holds"](keys=[keys.SLOT_HOLDS, keys.SLOTS],
                                                  args=[self.longest_hold_s, recheck_s,
                                                        self.longest_look_s]))

    def in_flight(self) -> int:
        return int(self.redis.zcard(keys.SLOTS))

    def waiting(self, batch: str | None = None) -> int:
        """Jobs waiting for a slot: in `batch`'s line, or in every batch's."""
        if batch is not None:
            return int(self.redis.zcard(keys.batch_line(batch)))
        names = sorted(str(name) for name in self.redis.smembers(keys.BATCHES))
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.zcard(keys.batch_line(name))
        return sum(pipe.execute()) + int(self.redis.llen(keys.ADMISSION))


def admit(admission: Admission, dispatch: Dispatch) -> int:
    """Fill free slots and publish a submit for each admitted job: the one
    place that does it (workers, enqueue, retry and the reconciler call it)."""
    admitted = admission.pump()
    for index, (ref, token) in enumerate(admitted):
        try:
            dispatch(Step.SUBMIT, ref, token, 0.0)
        except Exception:
            # Not published: due now, so the next reconciler pass sends them,
            # not a step grace later with their slots idle (if Redis answers).
            unsent = {unsent_ref: 0 for unsent_ref, _ in admitted[index:]}
            with contextlib.suppress(redis.RedisError):
                admission.redis.zadd(keys.DUE, unsent)
            raise
    return len(admitted)
