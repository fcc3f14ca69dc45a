"""Job records in Redis, and every atomic change to them.

The keys are listed in `worker.keys`; each change is one Lua script from
`worker/lua/`, loaded once. A step (submit, poll, download) runs only with
the job's current token, which it swaps atomically when it starts (`claim`);
a duplicated or redelivered message finds the token gone and does nothing,
so a job has one chain. Scripts read the clock from Redis (`TIME`), so leases
and due times never depend on a worker host's clock.
"""
from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import redis

from . import events, keys
from .connection import op_id, run_pipeline
from .durability import Durability, NotDurable

log = logging.getLogger(__name__)

LUA_DIR = Path(__file__).with_name("lua")


class State(StrEnum):
    QUEUED = "queued"
    SUBMITTED = "submitted"
    GENERATING = "generating"
    OVERDUE = "overdue"  # past the deadline, still polled slowly
    DOWNLOADING = "downloading"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # `vidq cancel`: never admitted, never POSTed


class Step(StrEnum):
    SUBMIT = "submit"
    POLL = "poll"
    DOWNLOAD = "download"


FINAL_STATES = frozenset({State.DONE, State.FAILED, State.CANCELLED})
OUTCOME_UNKNOWN = "outcome_unknown"


def lua_constants() -> str:
    """The state and step names, as Lua tables every script starts with: the
    enums above are their one definition."""
    states = ", ".join(f"{s.name.lower()} = '{s.value}'" for s in State)
    steps = ", ".join(f"{s.name.lower()} = '{s.value}'" for s in Step)
    # Key prefixes for keys a script derives from a batch name (worker.keys).
    prefixes = (f"local NS = {{job = '{keys.JOB_PREFIX}', batch = '{keys.BATCH_PREFIX}', "
                f"line = '{keys.LINE_SUFFIX}', ring = '{keys.RING_PREFIX}', "
                f"spend = '{keys.SPEND_PREFIX}', orphans = '{keys.ORPHANS}', "
                f"purged = '{keys.PURGED_BOOKINGS}', config = '{keys.CONFIG}', "
                f"purged_generations = '{keys.PURGED_GENERATIONS}', "
                f"purged_not_found = '{keys.PURGED_NOT_FOUND}'}}\n")
    return (f"local STATE = {{{states}}}\nlocal STEP = {{{steps}}}\n" + prefixes
            + (LUA_DIR / "common.lua").read_text())


def load_script(client: redis.Redis, name: str, libraries: tuple[str, ...] = ()):
    """A script, after the constants and the shared Lua `libraries` it uses."""
    return client.register_script(_script_text(name, libraries))


@functools.cache
def _script_text(name: str, libraries: tuple[str, ...]) -> str:
    parts = [lua_constants(), *((LUA_DIR / f"{lib}.lua").read_text() for lib in libraries),
             (LUA_DIR / f"{name}.lua").read_text()]
    return "".join(parts)


@dataclass
class Job:
    """One job's record, as read from its hash."""

    batch: str
    id: str
    request: dict
    state: str
    token: str = ""
    step: str = ""
    generation_id: str = ""
    attempts: int = 0
    polls: int = 0
    enqueued_at: float = 0.0
    submitted_at: float = 0.0
    completed_at: float = 0.0
    video_url: str = ""
    last_error: str = ""
    # Redis time when this step claimed the job, and the local monotonic clock then.
    claimed_at: float = 0.0
    claimed_mono: float = field(default_factory=time.monotonic)
    extra: dict = field(default_factory=dict)
    # What this step did, for its task's one-line summary (Flower's Result).
    outcome: str = ""
    failed: bool = False

    @property
    def ref(self) -> str:
        return keys.job_ref(self.batch, self.id)

    def now(self) -> float:
        """Redis server time, as of now, from the claim's reading."""
        return self.claimed_at + (time.monotonic() - self.claimed_mono)

    def number(self, name: str) -> float:
        try:
            return float(self.extra.get(name) or 0)
        except ValueError:
            return 0.0

    @classmethod
    def from_hash(cls, data: dict) -> Job:
        job = cls(batch=data["batch"], id=data["id"], request=json.loads(data["request"]),
                  state=data["state"], extra=data, token=data.get("token") or "",
                  step=data.get("step") or "", generation_id=data.get("generation_id") or "",
                  video_url=data.get("video_url") or "", last_error=data.get("last_error") or "")
        job.attempts, job.polls = int(job.number("attempts")), int(job.number("polls"))
        job.enqueued_at, job.submitted_at = job.number("enqueued_at"), job.number("submitted_at")
        job.completed_at, job.claimed_at = job.number("completed_at"), job.number("__now")
        return job


class JobStore:
    """Reads and changes job records; every change is one atomic script."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        self._scripts = {name: load_script(client, name) for name in (
            "transition", "claim", "record_generation", "mark_posting", "set_holder",
            "grow_cap", "clear_posting", "renew_lease", "keep_video", "found_again",
            "step_lost")}
        self._scripts["extend_pause"] = load_script(client, "extend_pause", ("pause_lib",))
        self._scripts["undo_unknown"] = load_script(client, "undo_unknown", ("line_lib",))
        self._scripts["back_in_line"] = load_script(client, "back_in_line",
                                                    ("line_lib", "pause_lib"))
        # Into done or failed: the event goes on the stream in the same call.
        self._scripts["transition"] = events.Announcing(client, "transition", "event_job")

    def now(self) -> float:
        seconds, micros = self.redis.time()
        return seconds + micros / 1e6

    def get(self, ref: str) -> Job | None:
        data = self.redis.hgetall(keys.job(ref))
        return Job.from_hash(data) if data else None

    def claim(self, ref: str, token: str, lease_s: float, holder: str) -> Job | None:
        """The job if `token` is current, after taking it; None for a stale message."""
        flat = self._scripts["claim"](
            keys=[keys.job(ref), keys.DUE, keys.PAUSE_SUBMIT, keys.PAUSE_POLL],
            args=[token, repr(lease_s), ref, holder, op_id()])
        if flat == "rolled back":  # lua/claim.lua: re-sent by the next reconciler pass
            log.warning("job %s: its record is older than this message (token %s): Redis "
                        "lost its last writes; its step is sent again", ref, token)
            return None
        if not flat:
            return None
        return Job.from_hash(dict(zip(flat[::2], flat[1::2], strict=True)))

    def keep_video(self, job: Job, size: int, digest: str) -> bool:
        """Record that `job`'s generation's video, `size` bytes with this
        sha256, is being published under its key (video.kept_video); False,
        nothing recorded, if this step no longer owns the job: it must not
        publish (lua/keep_video.lua)."""
        return bool(self._scripts["keep_video"](keys=[keys.job(job.ref)],
                                                args=[job.generation_id, digest, size,
                                                      job.token]))

    def renew_lease(self, job: Job, lease_s: float) -> bool:
        """Extend a running step's lease; False if its token moved on."""
        return bool(self._scripts["renew_lease"](keys=[keys.job(job.ref), keys.DUE],
                                                 args=[job.token, job.ref, repr(lease_s)]))

    def step_lost(self, ref: str, token: str) -> bool:
        """The step `token` claimed died with its pool child: due now
        (lua/step_lost.lua); False if the job moved on."""
        return bool(self._scripts["step_lost"](keys=[keys.job(ref), keys.DUE],
                                               args=[f"run:{token}", ref]))

    def set_holder(self, ref: str, token: str, holder: str) -> None:
        self._scripts["set_holder"](keys=[keys.job(ref)], args=[token, holder])

    def found_again(self, job: Job, running: bool) -> None:
        """The upstream knows `job`'s generation again after "not found"
        answers (lua/found_again.lua)."""
        self._scripts["found_again"](keys=[keys.job(job.ref), keys.SLOTS],
                                     args=[job.ref, job.token, "1" if running else "0"])

    def script(self, name: str):
        """One of the store's Lua scripts (worker/marker.py writes the marker)."""
        return self._scripts[name]

    def clear_posting(self, job: Job, op: str | None = None) -> bool:
        """The upstream proved this attempt created nothing (refused, 429, 503):
        the job may be POSTed again. False if the marker was not this attempt's
        (`op`, its mark_posting call's id; by default the one that answered)."""
        op = str(job.extra.get("posting_op", "")) if op is None else op
        return bool(self._scripts["clear_posting"](
            keys=[keys.job(job.ref), keys.SLOT_HOLDS, keys.SLOTS], args=[op, job.ref]))

    def undo_unknown(self, job: Job, reason: str = "") -> str:
        """The POST that made `job` "outcome unknown" was refused after all:
        undo what that booked (lua/undo_unknown.lua for the answers)."""
        return self._scripts["undo_unknown"](
            keys=[keys.job(job.ref), keys.batch_unknown(job.batch), keys.SLOT_HOLDS, keys.SLOTS],
            args=[job.ref, job.id, reason])

    def run_with_waits(self, build) -> list:
        """A script and the waits that make its write durable: a wait Redis
        refuses (WAITAOF after AOF was turned off) is an answer for
        Durability.check, not an error of the script that ran before it."""
        answers = run_pipeline(self.redis, build, raise_on_error=False)
        if answers and isinstance(answers[0], Exception):
            raise answers[0]
        return answers

    def record_generation(self, job: Job, generation_id: str, lease_s: float,
                          durability: Durability | None = None, deployment: str = "") -> str:
        """Record a paid generation id (lua/record_generation.lua for the
        answers; 'foreign' if `deployment`, a journal entry's Redis, is not
        this one), durable as the POST marker is: NotDurable (with the answer)
        if the wait for it failed, so the caller records it again, on the
        current master after a failover (the same call answers the same)."""
        batch = job.batch

        def build(pipe) -> None:
            self._scripts["record_generation"](
                keys=[keys.job(job.ref), keys.batch_counts(batch), keys.DUE, keys.SLOTS,
                      keys.SLOT_HOLDS, keys.batch_unknown(batch), keys.batch_jobs(batch),
                      keys.batch(batch), keys.batch_failed(batch), keys.ACCOUNT_REFUSALS],
                args=[generation_id, job.ref, repr(lease_s), keys.JOB_PREFIX,
                      str(job.extra.get("posting_op", "")), deployment,
                      repr(job.enqueued_at) if job.enqueued_at else ""], client=pipe)
            if durability is not None:
                durability.append_waits(pipe)

        recorded, *waits = self.run_with_waits(build)
        if recorded == "orphan":
            log.error("job %s: generation %s answered after the batch was purged; kept in "
                      "%s, not downloaded", job.ref, generation_id, keys.ORPHANS)
            recorded = generation_id
        if durability is not None:
            try:
                durability.check(waits)
            except NotDurable as exc:
                exc.answer = recorded  # the script ran: its answer stands
                raise
        return recorded

    def transition(self, job: Job, *, state: str = "", next_step: str = "",
                   due_in_s: float = 0.0, release_slot: bool = False, hold_slot_s: float = 0.0,
                   outcome_unknown: bool = False, expected_token: str | None = None,
                   **values) -> str | None:
        """Apply one change; returns the next step's token, '0' if the chain
        ended, None if the job's token moved on (someone else owns it)."""
        expected = job.token if expected_token is None else expected_token
        batch = job.batch
        script_keys = [keys.job(job.ref), keys.batch_counts(batch), keys.DUE, keys.SLOTS,
                       keys.SEQ, keys.SLOT_HOLDS, keys.batch_unknown(batch),
                       keys.batch_failed(batch), keys.batch_finished(batch)]
        args = [job.ref, expected, str(state), str(next_step), repr(due_in_s),
                "1" if release_slot else "0", repr(hold_slot_s), job.id,
                "1" if outcome_unknown else "0", op_id(), job.generation_id]
        for name, value in values.items():
            args += [name, _encode(value)]
        return self._scripts["transition"](keys=script_keys, args=args)

    def back_in_line(self, job: Job, pause_s: float, rate_limited: bool) -> int:
        """Put a job refused by a 429 (or by a pause) back at the front of its
        batch's line, pausing submits for `pause_s`; returns the effective cap."""
        return int(self._scripts["back_in_line"](
            keys=[keys.job(job.ref), keys.SLOTS, keys.DUE, keys.CONFIG, keys.PAUSE_SUBMIT,
                  keys.batch_counts(job.batch)],
            args=[job.ref, job.token, int(pause_s * 1000), "1" if rate_limited else "0"]))

    def pause_polls(self, pause_s: float) -> None:
        self._pause(keys.PAUSE_POLL, pause_s)

    def pause_submits(self, pause_s: float) -> None:
        self._pause(keys.PAUSE_SUBMIT, pause_s)

    def _pause(self, key: str, pause_s: float) -> None:
        self._scripts["extend_pause"](keys=[key], args=[max(1, int(pause_s * 1000))])

    def grow_cap(self, probe_factor: int, quiet_s: float, completed: bool) -> int:
        return int(self._scripts["grow_cap"](
            keys=[keys.CONFIG, keys.PAUSE_SUBMIT],
            args=[probe_factor, quiet_s, "1" if completed else "0"]))

    def counts(self, batch: str) -> dict[str, int]:
        raw = self.redis.hgetall(keys.batch_counts(batch))
        return {state.value: int(raw.get(state.value, 0)) for state in State}

    def batch_total(self, batch: str) -> int:
        return int(self.redis.hget(keys.batch(batch), "total") or 0)

    def outcome_unknown(self, batch: str) -> int:
        return int(self.redis.scard(keys.batch_unknown(batch)))

    def job_ids(self, batch: str) -> list[str]:
        return sorted(str(i) for i in self.redis.smembers(keys.batch_jobs(batch)))


def _encode(value) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)
