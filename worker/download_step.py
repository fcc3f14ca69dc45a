"""The download step, without Celery: a finished generation's video streamed
into storage, or found there already (worker/pipeline.py's submit looks
before it POSTs)."""
from __future__ import annotations

import logging
import time

from . import events, keys
from .admission import admit
from .jobs import Job, State
from .leases import TakenOver, lease_renewed, unless_lost
from .metrics_record import downloaded, upstream_call
from .step_outcomes import StepOutcomes
from .storage import video_key
from .upstream import file_length
from .video import kept_video, store_sidecar, stored_video, stream_video

log = logging.getLogger(__name__)


class Downloads(StepOutcomes):
    """The download step, and the storage check before a POST."""

    def download(self, job: Job) -> None:
        started = time.monotonic()
        key = video_key(job.batch, job.id)
        stored = kept_video(self.storage, job, key) or self._fetch_video(job, key)
        if stored is None:
            return
        size, digest = stored
        # A copy taken over meanwhile must not write its sidecar over its successor's.
        if not self.store.renew_lease(job, self.settings.download_grace_s):
            self._taken_over(job)
            return
        store_sidecar(self.storage, job, key, size, digest)
        if self.store.transition(job, state=State.DONE, storage_key=key, sha256=digest, bytes=size,
                                 storage_url=events.video_url(self.settings, key),
                                 downloaded_at=job.now(), download_s=time.monotonic() - started,
                                 last_error="") is None:
            self._taken_over(job)
            return
        log.info("job %s done: %d bytes, sha256 %s", job.ref, size, digest[:12])
        downloaded(size, time.monotonic() - started)
        job.outcome = f"done, {size / 1e6:.1f} MB"

    def _fetch_video(self, job: Job, key: str) -> tuple[int, str] | None:
        """Stream the result into storage: (bytes, sha256), None if taken over."""
        with upstream_call("download"):  # redirects and the answer's status included
            response = self.client.open_video(job.video_url)
        try:
            with response, lease_renewed(self.store, job, self.settings.download_grace_s) as lost:
                return stream_video(
                    self.storage, key, unless_lost(self.client.chunks(
                        response, 1 << 20, self.settings.download_grace_s / 3), lost),
                    file_length(response), lambda size, digest: self._publishing(job, size, digest))
        except TakenOver:
            self._taken_over(job)
            return None

    def _publishing(self, job: Job, size: int, digest: str) -> None:
        """Right before the video is published: TakenOver if another copy of
        the step owns the job now (the publish would replace its video)."""
        if not self.store.keep_video(job, size, digest):
            raise TakenOver

    def _already_stored(self, job: Job) -> bool:
        """A video and sidecar already in storage with a matching sha256 (Redis
        state lost, or a re-run): the job is done without a POST."""
        grace = self.settings.step_grace_s
        try:
            # Hashing a big stored video may outlast the step's lease.
            with lease_renewed(self.store, job, grace):
                found = stored_video(
                    self.storage, job, lambda: self.store.renew_lease(job, grace),
                    # Written for this batch (a retry reopened it): not an earlier one's.
                    lambda: bool(self.store.redis.hget(keys.batch(job.batch), "manifest_of")))
        except TakenOver:
            self._taken_over(job)
            return True
        if found is None:
            return False
        log.info("job %s: video already in storage (sha256 %s); not submitted", job.ref,
                 found["sha256"][:12])
        # Settled first (it is once per admission): a worker killed between
        # the two calls then leaves no commitment counted for good.
        self.admission.settle(job.ref, "stored")
        self.store.transition(job, state=State.DONE, release_slot=True, storage_key=found["video"],
                              storage_url=events.video_url(self.settings, found["video"]),
                              sha256=found["sha256"], bytes=found["bytes"],
                              generation_id=found.get("generation_id") or "", last_error="")
        admit(self.admission, self.dispatch)
        return True
