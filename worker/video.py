"""A finished video in storage: streamed in and checked, its sidecar, and
whether a job's video is already there (the resume rule)."""
from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable

from . import manifest
from .errors import CorruptVideo, SidecarNotStored, StorageError
from .jobs import Job
from .leases import TakenOver
from .rows import effective_parameters
from .storage import Storage, sidecar_key, video_key

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]")  # generation ids are opaque: keep them to a file name


def stream_video(storage: Storage, key: str, chunks: Iterable[bytes], announced: str | None,
                 before_publish: Callable[[int, str], None] | None = None) -> tuple[int, str]:
    """Write chunks under `key`, published only whole; returns (bytes, sha256).
    `announced` is the Content-Length (None when the body is not sent as is).
    `before_publish(bytes, sha256)` runs once the video is checked whole, just
    before it is published (by the storage, after the bytes are on disk or
    uploaded): a worker that dies after publishing it leaves a record of what
    is there, and a step taken over meanwhile can still stop it."""
    digest, size, head, boxes = hashlib.sha256(), 0, b"", Mp4Boxes()
    whole: list[tuple[int, str]] = []  # (bytes, sha256), once checked
    hook = None if before_publish is None else (lambda: before_publish(*whole[0]))
    with storage.writer(key, before_publish=hook) as out:
        for chunk in chunks:
            if len(head) < 8:
                head = _check_mp4_head(head + chunk[:8 - len(head)])
            boxes.feed(chunk)
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
        if len(head) < 8:
            raise CorruptVideo(f"got only {size} bytes: not an MP4")
        if announced is not None and announced.isdigit() and size != int(announced):
            raise CorruptVideo(f"got {size} bytes, Content-Length said {announced}")
        boxes.check_whole(size)
        whole.append((size, digest.hexdigest()))
    return whole[0]


class Mp4Boxes:
    """The top-level MP4 boxes, walked as the bytes stream by. A body cut
    short without an error (a server that closes a response sent without
    Content-Length, a CDN's cached cut object with a length to match) ends
    inside its last box: only the box sizes tell."""

    def __init__(self) -> None:
        self.header = b""  # of the box being read
        self.skip = 0  # bytes of the current box still to come
        self.to_end = False  # a box of size 0 runs to the end of the file
        self.seen: set[bytes] = set()

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view and not self.to_end:
            if self.skip:
                taken = min(self.skip, len(view))
                self.skip -= taken
                view = view[taken:]
                continue
            wanted = self._header_size() - len(self.header)
            self.header += bytes(view[:wanted])
            view = view[wanted:]
            if len(self.header) == self._header_size():
                self._open_box()

    def _header_size(self) -> int:
        large = len(self.header) >= 4 and int.from_bytes(self.header[:4], "big") == 1
        return 16 if large else 8

    def _open_box(self) -> None:
        header, self.header = self.header, b""
        size, kind = int.from_bytes(header[:4], "big"), header[4:8]
        if size == 1:
            size = int.from_bytes(header[8:16], "big")
        self.seen.add(kind)
        if size == 0:
            self.to_end = True
        elif size < len(header):
            raise CorruptVideo(f"MP4 box {kind!r} says {size} bytes, less than its header")
        else:
            self.skip = size - len(header)

    def check_whole(self, size: int) -> None:
        # A few bytes of padding after the last box (too few for a box
        # header) are tolerated: refusing them would lose a paid video that
        # plays, for good.
        if self.header and not self.skip and {b"moov", b"mdat"} <= self.seen:
            return
        if self.skip or self.header:
            missing = self.skip or self._header_size() - len(self.header)
            raise CorruptVideo(f"got {size} bytes, cut inside an MP4 box "
                               f"({missing} or more bytes missing)")
        if not {b"moov", b"mdat"} <= self.seen:
            raise CorruptVideo(f"got {size} bytes: an MP4 without its moov and mdat boxes")


def sidecar(job: Job, key: str, size: int, digest: str, now: float) -> dict:
    request = dict(job.request)
    return {
        "job_id": job.id, "batch": job.batch, "prompt": request.pop("prompt"),
        # With the upstream's defaults filled in: what was generated, not only what was asked.
        "model": request.pop("model"), "parameters": effective_parameters(request),
        "generation_id": job.generation_id, "video": key, "sha256": digest, "bytes": size,
        "credits_used": job.number("credits_used") if job.extra.get("credits_used") else None,
        "timings": {
            "enqueued_at": job.enqueued_at, "submitted_at": job.submitted_at,
            "completed_at": job.completed_at or None, "downloaded_at": now,
            "generation_s": round(job.completed_at - job.submitted_at, 3)
            if job.completed_at else None,
            "status_polls": job.polls,
        },
    }


def store_sidecar(storage: Storage, job: Job, key: str, size: int, digest: str) -> None:
    """Write the sidecar of a video stored whole under `key`."""
    card = sidecar(job, key, size, digest, job.now())
    try:
        storage.put_bytes(sidecar_key(job.batch, job.id), json.dumps(card, indent=2).encode())
    except StorageError as exc:
        raise SidecarNotStored(str(exc)) from None


def kept_video(storage: Storage, job: Job, key: str) -> tuple[int, str] | None:
    """(bytes, sha256) of the video an earlier attempt stored whole (recorded
    as it was published: `stream_video`'s `before_publish`), say before its
    sidecar failed or its worker died: not fetched again, since the result may
    no longer be served. None when there is none, it changed, or it is another
    generation's."""
    kept = job.extra.get("kept_sha256")
    if job.extra.get("kept_generation") != job.generation_id:
        return None  # another generation's video (a --resubmit since)
    if kept and storage.exists(key) and storage.sha256(key) == kept:
        return int(job.number("kept_bytes")), kept
    return None


def stored_video(storage: Storage, job: Job,
                 still_ours: Callable[[], bool] = lambda: True,
                 manifest_written: Callable[[], bool] = lambda: False) -> dict | None:
    """The sidecar of this job's video if both are in storage and the video's
    sha256 matches the sidecar's; None otherwise. A video under this job's key
    that is not that (another request's: a batch name and id reused, after a
    purge or retention; or one whose sidecar was never written) was paid for:
    it is moved to `<batch>/replaced/`, never overwritten, while `still_ours()`
    (the step's token) holds, and with it the batch's manifest, unless
    `manifest_written()` says it is this batch's own. Raises StorageError
    when storage cannot tell."""
    card_key, key = sidecar_key(job.batch, job.id), video_key(job.batch, job.id)
    # A storage error is not "not stored": the caller must not POST on it
    # (a throttled or misconfigured bucket would buy every video again).
    if not storage.exists(card_key):
        if storage.exists(key):
            set_aside(storage, job, {}, still_ours, manifest_written)
        return None
    try:
        card = json.loads(storage.read_bytes(card_key))
    except ValueError:
        card = None
    if not isinstance(card, dict):
        set_aside(storage, job, {}, still_ours, manifest_written)
        return None
    if not _same_request(card, job.request):
        set_aside(storage, job, card, still_ours, manifest_written)
        return None
    if not isinstance(card.get("sha256"), str) or not storage.exists(key):
        return None
    if storage.sha256(key) != card["sha256"]:
        return None
    return card


def set_aside(storage: Storage, job: Job, card: dict,
              still_ours: Callable[[], bool] = lambda: True,
              manifest_written: Callable[[], bool] = lambda: False) -> str:
    """Move the video and sidecar under `job`'s keys, those of the generation
    `card` names (`{}`: none readable), to `<batch>/replaced/<id>.<generation,
    else the video's sha256>`; returns that name.
    The video goes first: a try stopped between the two finds the sidecar
    still there, and moves it to the same name."""
    key = video_key(job.batch, job.id)
    made_by = str(card.get("generation_id") or card.get("sha256") or "")
    if not made_by:  # no sidecar to name it: its own bytes do
        made_by = storage.sha256(key)[:16] if storage.exists(key) else "unknown"
    tag = _SAFE.sub("_", made_by)[:64]
    aside = f"{job.batch}/replaced/{job.id}.{tag}"
    def move(source: str, target: str) -> bool:
        # Only the step that owns the job moves anything: a stale copy of it
        # (re-sent while this one hashed a big file) would move the video the
        # job's new chain just stored.
        if not still_ours():
            raise TakenOver(f"job {job.ref}: its submit was taken over")
        return storage.move(source, target)

    moved = move(key, f"{aside}.mp4")
    move(sidecar_key(job.batch, job.id), f"{aside}.json")
    if not manifest_written():
        manifest.move_earlier_aside(storage, job.batch, tag)
    log.warning("job %s: storage held a video under its name that is not this request's "
                "(or has no sidecar); %s to %s, not overwritten", job.ref,
                "moved" if moved else "its sidecar moved", aside)
    return aside


def _same_request(card: dict, request: dict) -> bool:
    """The sidecar's video is what the job asks for: the same prompt, model
    and parameters (an explicit id reused at 480P after a 720P night is a new
    video, not the old one)."""
    if (card.get("prompt"), card.get("model")) != (request.get("prompt"), request.get("model")):
        return False
    return json.loads(json.dumps(effective_parameters(request))) == card.get("parameters")


def _check_mp4_head(head: bytes) -> bytes:
    # Every MP4 starts with a box whose type, bytes 4-8, is 'ftyp'.
    if len(head) >= 8 and head[4:8] != b"ftyp":
        raise CorruptVideo(f"not an MP4: first bytes {head[:8]!r} have no 'ftyp' box")
    return head
