"""Counting in a worker process: hooks called by the steps and the upstream
client add to a process-local buffer, and the buffer goes to Redis in one
pipeline when the task ends (Celery's task_postrun, hooked in worker/tasks.py),
so a step costs one round trip for its metrics whatever it counted.

The buffer is per process and guarded by a lock (a submit's POST runs in a
thread, and its answer may arrive after its step ended: it is then written
with the next task that ends in that process). A pool child forked from a
parent with counts in its buffer starts empty: the parent's counts are the
parent's to write.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import redis

from . import keys
from .connection import op_id
from .errors import (
    BadResponse,
    RateLimited,
    RequestRejected,
    ResultRefused,
    SubmitOutcomeUnknown,
    UpstreamError,
)
from .jobs import load_script
from .metrics import (
    COMPLETIONS,
    DETECTION_LAG_SECONDS,
    DOWNLOAD_BYTES,
    DOWNLOAD_SECONDS,
    DOWNLOADS,
    GENERATION_SECONDS,
    JOB_FAILURES,
    RESENDS,
    STATUS_GETS_PER_VIDEO,
    UPSTREAM_SECONDS,
    Spec,
    bucket_field,
    counter_field,
    sum_field,
)

log = logging.getLogger(__name__)

REPLAY_TTL_S = 300  # a call sent again comes within redis-py's retries


class Recorder:
    """Increments waiting to be written: integer counts and float sums."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._counts: Counter[str] = Counter()
        self._sums: defaultdict[str, float] = defaultdict(float)
        self._unsure: Increments | None = None  # sent, reply lost: send again as is

    def count(self, spec: Spec, values: tuple[str, ...] = (), amount: float = 1) -> None:
        with self._lock:
            self._own()
            self._sums[counter_field(spec, values)] += amount

    def observe(self, spec: Spec, values: tuple[str, ...], value: float) -> None:
        with self._lock:
            self._own()
            self._counts[bucket_field(spec, values, value)] += 1
            self._sums[sum_field(spec, values)] += value

    def pending(self) -> bool:
        with self._lock:
            self._own()
            return bool(self._counts or self._sums or self._unsure)

    def flush(self, client: redis.Redis) -> None:
        """Write what was counted, as one call with its own id. A call that
        failed may have run (its reply lost): it is kept, and sent again
        first, under the same id, so Redis applies it once."""
        with self._lock:
            self._own()
            unsure, self._unsure = self._unsure, None
            counts, sums = self._counts, self._sums
            self._counts, self._sums = Counter(), defaultdict(float)
        batches = [unsure] if unsure else []
        if counts or sums:
            batches.append(Increments(op_id(), dict(counts), dict(sums)))
        for index, batch in enumerate(batches):
            try:
                apply(client, batch)
            except redis.RedisError as exc:
                log.warning("metrics not written yet: %s", exc)
                self._keep(batch, batches[index + 1:])
                return

    def _keep(self, unsure: Increments, unsent: list[Increments]) -> None:
        with self._lock:
            self._unsure = unsure
            for batch in unsent:  # never sent: they may merge into the buffer
                self._counts.update(batch.counts)
                for field, total in batch.sums.items():
                    self._sums[field] += total

    def _own(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._counts, self._sums, self._unsure = Counter(), defaultdict(float), None


@dataclass(frozen=True)
class Increments:
    """One write of the metrics hash, with the id that makes it apply once."""

    op: str
    counts: dict[str, int]
    sums: dict[str, float]


def apply(client: redis.Redis, batch: Increments) -> None:
    """Add `batch` to the metrics hash, at most once whatever the retries."""
    args: list[str | int | float] = [REPLAY_TTL_S, len(batch.counts)]
    for field, amount in batch.counts.items():
        args += [field, amount]
    for field, total in batch.sums.items():
        args += [field, repr(total)]
    load_script(client, "metrics_apply")(keys=[keys.METRICS, keys.METRICS_REPLAY + batch.op],
                                          args=args)


# One per process, like prometheus-client's default registry: the hooks are
# called from code (the upstream client) that holds no Redis connection.
RECORDER = Recorder()


def outcome_of(error: BaseException | None) -> str:
    """The bounded outcome label of an upstream call that ended with `error`."""
    if error is None:
        return "2xx"
    status = getattr(error, "status", None)
    if isinstance(error, RateLimited) or status == 429:
        return "429"
    if isinstance(status, int) and 300 <= status < 600:
        return f"{status // 100}xx"
    if isinstance(error, SubmitOutcomeUnknown):
        return "answer_lost"
    if isinstance(error, BadResponse):
        return "bad_body"
    if isinstance(error, ResultRefused | RequestRejected):
        return "refused"
    if isinstance(error, UpstreamError) and "Timeout" in str(error):
        return "timeout"
    return "network"


@contextlib.contextmanager
def upstream_call(call: str) -> Iterator[None]:
    """Time one upstream call and count its outcome (errors pass through)."""
    started = time.monotonic()
    error: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        error = exc
        raise
    finally:
        RECORDER.observe(UPSTREAM_SECONDS, (call, outcome_of(error)),
                         time.monotonic() - started)


def completed(model: str, resolution: str, polls: int, previous_poll_s: float,
              completed_poll_s: float) -> None:
    """A generation seen done by its `polls`-th status GET, `completed_poll_s`
    after submit; the poll before it was at `previous_poll_s` (0: none)."""
    shape = (model, resolution)
    RECORDER.observe(STATUS_GETS_PER_VIDEO, shape, polls)
    if previous_poll_s <= 0:
        # Censored: done by the first poll, when exactly is unknown; counted
        # at half the poll time (the poll plan fits the interval itself).
        RECORDER.count(COMPLETIONS, (*shape, "first_poll"))
        RECORDER.observe(GENERATION_SECONDS, shape, completed_poll_s / 2)
        return
    RECORDER.count(COMPLETIONS, (*shape, "later_poll"))
    RECORDER.observe(GENERATION_SECONDS, shape, (previous_poll_s + completed_poll_s) / 2)
    RECORDER.observe(DETECTION_LAG_SECONDS, shape, (completed_poll_s - previous_poll_s) / 2)


def downloaded(size: int, seconds: float) -> None:
    RECORDER.count(DOWNLOADS)
    RECORDER.count(DOWNLOAD_BYTES, (), size)
    RECORDER.count(DOWNLOAD_SECONDS, (), seconds)


# A permanent upstream error ends a job with "<step>: <message>": its kind by step.
STEP_FAILURE_KINDS = {"submit": "rejected", "poll": "generation_failed",
                      "download": "download_refused"}


def failure_kind(step: str, reason: str) -> str:
    """The bounded kind of a failure reason as `Steps.fail` and the tasks write it."""
    if reason.startswith("outcome_unknown"):
        return "outcome_unknown"
    if reason.startswith("timeout:"):
        return "timeout"
    if reason.startswith("download: result link refused"):
        return "link_refused"
    if reason.startswith(f"{step}: gave up after "):
        return "gave_up"
    return STEP_FAILURE_KINDS.get(step, "other")


def failed(step: str, reason: str) -> None:
    RECORDER.count(JOB_FAILURES, (failure_kind(step, reason),))


def resent(client: redis.Redis, steps: int) -> None:
    """Reconciler re-sends, written at once: the reconciler runs in a worker's
    main process, where no task ends to flush a buffer."""
    if steps:
        try:
            apply(client, Increments(op_id(), {}, {counter_field(RESENDS, ()): steps}))
        except redis.RedisError as exc:
            log.warning("re-send count not written: %s", exc)

