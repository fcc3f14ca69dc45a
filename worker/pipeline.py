"""The logic of each step, without Celery: submit, poll, download, fail, retry.

Each method takes a claimed `Job`, talks to the upstream, writes the record
in one atomic transition and hands the next step to `dispatch`. Errors are
raised to the caller (the task), which decides between `retry` and `fail`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

import redis
import requests

from .admission import Admission, Dispatch
from .errors import CorruptVideo, RateLimited, UpstreamError, UpstreamUnavailable
from .jobs import Job, JobStore, job_key
from .schedule import DurationModel, backoff_delay, first_poll_delay, next_poll_delay
from .settings import Settings
from .storage import FileStorage, sidecar_key, video_key
from .upstream import Generation, UpstreamClient

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
# Rate limiting is the upstream saying "not now", not a fault: allow more tries.
RATE_LIMIT_ATTEMPT_FACTOR = 5
_BUSY = object()  # another process is posting this job right now


@dataclass
class Steps:
    """Everything one step needs; built once per worker process."""

    settings: Settings
    store: JobStore
    admission: Admission
    client: UpstreamClient
    storage: FileStorage
    durations: DurationModel
    dispatch: Dispatch
    clock: Callable[[], float] = time.time

    def claim(self, ref: str, token: str, step: str) -> Job | None:
        return self.store.claim(ref, token, self.clock() + self.settings.grace_s(step))

    def submit(self, job: Job) -> None:
        if job.generation_id:
            # Requeued or redelivered: the generation exists; look at it now.
            return self._next(job, "poll", self.settings.poll_min_interval_s, attempts=0)
        generation = self._post_once(job)
        if generation is _BUSY:
            return
        if generation is not None:
            generation.raise_if_failed()
        expected = self._expected_s(job)
        delay = first_poll_delay(expected, self.settings.poll_min_interval_s,
                                 self.settings.poll_max_interval_s)
        self._next(job, "poll", delay, attempts=0)

    def _post_once(self, job: Job):
        """POST the job and record its generation id at once. _BUSY if another
        process is posting it right now; None if one already recorded an id."""
        lock = self.store.redis.lock(f"vidq:submitting:{job.ref}",
                                     timeout=2 * self.settings.http_timeout_s + 5)
        if not lock.acquire(blocking=False):
            log.warning("submit of %s already in progress elsewhere; dropping", job.ref)
            return _BUSY
        try:
            known = self.store.redis.hget(job_key(job.ref), "generation_id")
            if known:
                job.generation_id = known
                return None
            generation = self.client.submit(job.request)
            now = self.clock()
            job.generation_id = self.store.record_generation(
                job, generation.id, now, now + self.settings.step_grace_s)
        finally:
            with contextlib.suppress(redis.exceptions.LockError):
                lock.release()
        job.submitted_at = job.submitted_at or self.clock()
        log.info("job %s submitted as generation %s", job.ref, job.generation_id)
        return generation

    def poll(self, job: Job) -> None:
        generation = self.client.fetch(job.generation_id)
        job.polls += 1
        now = self.clock()
        if generation.succeeded:
            return self._completed(job, generation, now)
        generation.raise_if_failed()
        if now >= self._deadline_at(job):
            return self.fail(job, f"timeout: still {generation.status!r} after "
                                  f"{self.settings.deadline_s:.0f} s")
        delay = next_poll_delay(self._expected_s(job), job.polls,
                                self.settings.poll_min_interval_s,
                                self.settings.poll_max_interval_s, now - job.submitted_at)
        self._next(job, "poll", delay, state="generating", polls=job.polls,
                   attempts=0, last_poll_delay=delay)

    def download(self, job: Job) -> None:
        started = self.clock()
        key = video_key(job.batch, job.id)
        size, digest = self._stream_video(job, key)
        now = self.clock()
        sidecar = self._sidecar(job, key, size, digest, now)
        self.storage.put_bytes(sidecar_key(job.batch, job.id), json.dumps(sidecar, indent=2).encode())
        self.store.transition(job, state="done", storage_key=key, sha256=digest, bytes=size,
                              downloaded_at=now, download_s=now - started, last_error="")
        log.info("job %s done: %d bytes, sha256 %s", job.ref, size, digest[:12])

    def refresh_link(self, job: Job, error: UpstreamError) -> None:
        """A result URL expired: fetch the generation again for a fresh one."""
        refreshes = int(job.extra.get("link_refreshes") or 0) + 1
        if refreshes > self.settings.max_attempts:
            return self.fail(job, f"download: result link refused {refreshes} times: {error}")
        delay = backoff_delay(refreshes, self.settings.backoff_base_s, self.settings.backoff_cap_s)
        self._next(job, "poll", delay, link_refreshes=refreshes, last_error=str(error),
                   polls=job.polls)

    def retry(self, job: Job, error: Exception) -> None:
        delay = getattr(error, "retry_after", None)
        if delay is None:
            delay = backoff_delay(job.attempts + 1, self.settings.backoff_base_s,
                                  self.settings.backoff_cap_s)
        self._retry_as(job, job.step, error, delay=min(delay, self.settings.backoff_cap_s))

    def fail(self, job: Job, reason: str) -> None:
        log.warning("job %s failed: %s", job.ref, reason)
        self.store.transition(job, state="failed", release_slot=True, last_error=reason,
                              failed_at=self.clock(), polls=job.polls)
        self.admit()

    def admit(self) -> None:
        for ref, token in self.admission.pump(self.clock()):
            self.dispatch("submit", ref, token, 0.0)

    def _retry_as(self, job: Job, step: str, error: Exception, delay: float) -> None:
        attempts = job.attempts + 1
        limit = self.settings.max_attempts
        if isinstance(error, RateLimited):
            limit *= RATE_LIMIT_ATTEMPT_FACTOR
        # A paid generation is polled until its deadline, however many tries
        # an upstream outage costs; other steps give up after `limit`.
        polling_paid = step == "poll" and self.clock() < self._deadline_at(job)
        if attempts >= limit and not polling_paid:
            return self.fail(job, f"{job.step}: gave up after {attempts} attempts: {error}")
        log.info("job %s: %s retry %d in %.1f s: %s", job.ref, step, attempts, delay, error)
        self._next(job, step, delay, attempts=attempts, last_error=str(error), polls=job.polls)

    def _completed(self, job: Job, generation: Generation, now: float) -> None:
        values = {"video_url": generation.video_url, "polls": job.polls, "attempts": 0}
        if generation.credits_used is not None:
            values["credits_used"] = generation.credits_used
        if not job.completed_at:
            values["completed_at"] = now
            self.durations.record(*self._shape(job), now - job.submitted_at, job.polls,
                                  float(job.extra.get("last_poll_delay") or 0))
        self._next(job, "download", 0.0, state="downloading", release_slot=True, **values)
        self.admit()

    def _next(self, job: Job, step: str, delay: float, **values) -> None:
        grace = self.settings.grace_s(step)
        token = self.store.transition(job, next_step=step, due_at=self.clock() + delay + grace,
                                      **values)
        if token is None:
            log.info("job %s was taken over by a newer step; this chain stops", job.ref)
            return
        self.dispatch(step, job.ref, token, delay)

    def _stream_video(self, job: Job, key: str) -> tuple[int, str]:
        response = self.client.open_video(job.video_url)
        with response:
            announced = response.headers.get("Content-Length")
            digest, size, head = hashlib.sha256(), 0, b""
            with self.storage.writer(key) as out:
                for chunk in _chunks(response):
                    if len(head) < 8:
                        head = _check_mp4_head(head + chunk[:8 - len(head)])
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                if len(head) < 8:
                    raise CorruptVideo(f"got only {size} bytes: not an MP4")
                if announced is not None and size != int(announced):
                    raise CorruptVideo(f"got {size} bytes, Content-Length said {announced}")
        return size, digest.hexdigest()

    def _sidecar(self, job: Job, key: str, size: int, digest: str, now: float) -> dict:
        request = dict(job.request)
        extra = job.extra
        return {
            "job_id": job.id, "batch": job.batch, "prompt": request.pop("prompt"),
            "model": request.pop("model"), "parameters": request,
            "generation_id": job.generation_id, "video": key, "sha256": digest, "bytes": size,
            "credits_used": _number(extra.get("credits_used")),
            "timings": {
                "enqueued_at": job.enqueued_at, "submitted_at": job.submitted_at,
                "completed_at": job.completed_at or None, "downloaded_at": now,
                "generation_s": round(job.completed_at - job.submitted_at, 3)
                if job.completed_at else None,
                "status_polls": job.polls,
            },
        }

    def _deadline_at(self, job: Job) -> float:
        # Counted from admission too, so a job requeued by `vidq retry` gets a
        # fresh deadline when it gets a slot, not when the retry was asked.
        admitted_at = float(job.extra.get("admitted_at") or 0)
        return max(job.submitted_at, admitted_at) + self.settings.deadline_s

    def _shape(self, job: Job) -> tuple[str, str]:
        return job.request["model"], job.request.get("resolution", "720P")

    def _expected_s(self, job: Job) -> float:
        return self.durations.expected_s(*self._shape(job))


def _chunks(response):
    try:
        yield from response.iter_content(CHUNK_BYTES)
    except requests.RequestException as exc:
        raise UpstreamUnavailable(f"download interrupted: {type(exc).__name__}") from None


def _check_mp4_head(head: bytes) -> bytes:
    # Every MP4 starts with a box whose type, bytes 4-8, is 'ftyp'.
    if len(head) >= 8 and head[4:8] != b"ftyp":
        raise CorruptVideo(f"not an MP4: first bytes {head[:8]!r} have no 'ftyp' box")
    return head


def _number(raw):
    return float(raw) if raw not in (None, "") else None
