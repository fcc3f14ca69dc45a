"""Generations, counters, the ledger and injected faults of one sandbox.

All mutable state lives in SandboxState behind one lock; HTTP handler threads
only call its methods. Rendering videos (slow) always happens outside the lock.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
import random
import secrets
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from sandbox import journal
from sandbox.config import SandboxConfig
from sandbox.validation import defaulted
from sandbox.videos import VideoCache, VideoFile, frame_size

# Per process, so links signed by an earlier run are rejected like forged ones.
SIGNING_SECRET = secrets.token_bytes(32)
CREDITS_PER_VIDEO = 120000
QUEUED_FRACTION = 0.1  # share of a generation's time spent "queued"
FAULT_KINDS = ("submit", "poll", "download")
STAT_NAMES = ("submissions", "rejected_submissions", "polls", "downloads",
              "max_in_flight", "rate_limited", "too_fast")
STATS_ORDER = ("submissions", "rejected_submissions", "polls", "downloads",
               "max_in_flight", "in_flight", "duplicate_prompts", "rate_limited", "too_fast")


def sign(gen_id: str, expires: int) -> str:
    return hmac.new(SIGNING_SECRET, f"{gen_id}:{expires}".encode(), hashlib.sha256).hexdigest()


class RateLimited(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"retry after {retry_after}s")
        self.retry_after = retry_after


class DownloadDenied(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Fault:
    status: int
    retry_after: int | None  # a 429's Retry-After header; None: no header


@dataclass
class Generation:
    id: str
    prompt: str
    body: object
    endpoint: str
    width: int
    height: int
    submitted_at: float
    completes_at: float
    rejected: bool
    failed_status: str = "error"
    polls: int = 0
    downloads: int = 0
    url_expires: int | None = None  # Expires of the current signed URL
    revoked_expires: set[int] = field(default_factory=set)  # via POST /__expire
    video: VideoFile | None = None
    forgotten: bool = False  # via POST /__forget: 404 from then on

    def status(self, now: float) -> str:
        if now >= self.completes_at:
            return self.failed_status if self.rejected else "completed"
        queued_until = self.submitted_at + QUEUED_FRACTION * (self.completes_at - self.submitted_at)
        return "queued" if now < queued_until else "generating"

    def is_downloadable(self, now: float) -> bool:
        return self.status(now) == "completed"


class SandboxState:
    def __init__(self, config: SandboxConfig, videos: VideoCache):
        self.config = config
        self.videos = videos
        self._lock = threading.Lock()
        self.reset()
        self._journal = Path(config.journal_path) if config.journal_path else None
        if self._journal:
            self._restore(journal.load(self._journal))

    def _restore(self, records: list[dict]) -> None:
        now = time.time()
        with self._lock:
            for record in records:
                gen = Generation(**record)
                self._generations[gen.id] = gen
                self._prompt_counts[gen.prompt] += 1
                if gen.completes_at > now:
                    heapq.heappush(self._in_flight, gen.completes_at)

    def reset(self) -> None:
        with self._lock:
            self._rng = random.Random(self.config.seed)  # same durations after each reset
            self._generations: dict[str, Generation] = {}
            self._in_flight: list[float] = []  # min-heap of completion times
            self._recent_posts: deque[float] = deque()  # times of the last second's POSTs
            self._prompt_counts: Counter[str] = Counter()
            self._stats = dict.fromkeys(STAT_NAMES, 0)
            self._faults: dict[str, deque[Fault]] = {kind: deque() for kind in FAULT_KINDS}

    # -- submissions ---------------------------------------------------------
    def _duration_s(self) -> float:
        mean = self.config.mean_generation_s
        drawn = self._rng.gauss(mean, self.config.spread * mean)
        return min(max(drawn, 0.5 * mean), 1.6 * mean) / self.config.time_scale

    def _prune_in_flight(self, now: float) -> None:
        while self._in_flight and self._in_flight[0] <= now:
            heapq.heappop(self._in_flight)

    def submit(self, body: dict, endpoint: str) -> Generation:
        """Accept a validated body, or raise RateLimited at max_concurrency."""
        now = time.time()
        width, height = frame_size(defaulted(body, "resolution"), defaulted(body, "aspect_ratio"))
        prompt = body["prompt"]
        reject = self.config.reject_substring
        with self._lock:
            self._prune_in_flight(now)
            self._count_post(now)
            limit = self.config.max_concurrency
            if 0 < limit <= len(self._in_flight):
                self._stats["rejected_submissions"] += 1
                self._stats["rate_limited"] += 1
                raise RateLimited(max(1, math.ceil(self._in_flight[0] - now)))
            gen = Generation(str(uuid.uuid4()), prompt, body, endpoint, width, height,
                             now, now + self._duration_s(), bool(reject) and reject in prompt,
                             self.config.failed_status)
            self._generations[gen.id] = gen
            heapq.heappush(self._in_flight, gen.completes_at)
            self._stats["submissions"] += 1
            self._stats["max_in_flight"] = max(self._stats["max_in_flight"], len(self._in_flight))
            self._prompt_counts[prompt] += 1
            if self._journal:
                journal.append(self._journal, gen)
        if not gen.rejected:
            self.videos.prepare_async(width, height)
        return gen

    def _count_post(self, now: float) -> None:
        """Raise RateLimited past max_submits_per_s POSTs in the last second."""
        per_second = self.config.max_submits_per_s
        if per_second <= 0:
            return
        while self._recent_posts and self._recent_posts[0] <= now - 1.0:
            self._recent_posts.popleft()
        if len(self._recent_posts) >= per_second:
            self._stats["rejected_submissions"] += 1
            self._stats["rate_limited"] += 1
            self._stats["too_fast"] += 1
            raise RateLimited(1)
        self._recent_posts.append(now)

    def count_rejected_submission(self, status: int) -> None:
        with self._lock:
            self._stats["rejected_submissions"] += 1
            self._stats["rate_limited"] += status == 429

    # -- polling -------------------------------------------------------------
    def poll(self, gen_id: str, file_base_url: str) -> dict | None:
        """The provider's response shape for one generation; None if unknown."""
        with self._lock:
            gen = self._generations.get(gen_id)
            if gen is None or gen.forgotten:
                return None
            gen.polls += 1
            self._stats["polls"] += 1
        self._attach_video_if_done(gen)
        with self._lock:
            return self._response_for(gen, time.time(), file_base_url)

    def _attach_video_if_done(self, gen: Generation) -> None:
        # Renders on first completion of a shape; blocks only this request.
        if gen.video is None and gen.is_downloadable(time.time()):
            gen.video = self.videos.get(gen.width, gen.height)

    def _current_expires(self, gen: Generation, now: float) -> int:
        ttl = self.config.url_ttl_s / self.config.time_scale
        if gen.url_expires is None:
            gen.url_expires = math.ceil(gen.completes_at + ttl)
        if gen.url_expires <= now or gen.url_expires in gen.revoked_expires:
            # Like the provider re-signing a stale link when it is polled again.
            gen.url_expires = max(math.ceil(now + ttl), gen.url_expires + 1)
        return gen.url_expires

    def _response_for(self, gen: Generation, now: float, file_base_url: str) -> dict:
        status = gen.status(now)
        response: dict[str, object] = {
            "id": gen.id, "status": status, "video": None, "error": None, "meta": None}
        if status == "completed":
            expires = self._current_expires(gen, now)
            response["video"] = {"url": f"{file_base_url}/files/{gen.id}.mp4"
                                        f"?Expires={expires}&Signature={sign(gen.id, expires)}"}
            response["meta"] = {"usage": {"credits_used": CREDITS_PER_VIDEO}}
        elif gen.rejected and status == gen.failed_status:
            response["error"] = {
                "name": "ContentPolicyViolation",
                "message": "Prompt rejected by content policy: the prompt contains "
                           f"the blocked term {self.config.reject_substring!r}",
            }
        return response

    def expire_url(self, gen_id: str) -> bool:
        """Make the generation's current signed URL invalid from now on."""
        with self._lock:
            gen = self._generations.get(gen_id)
            if gen is None:
                return False
            if gen.url_expires is not None:
                gen.revoked_expires.add(gen.url_expires)
            return True

    def forget(self, gen_id: str) -> bool:
        """Answer 404 for the generation from now on, no longer counted against
        max_concurrency: the upstream lost it, or the key is now another
        account's."""
        with self._lock:
            gen = self._generations.get(gen_id)
            if gen is None:
                return False
            gen.forgotten = True
            if gen.completes_at in self._in_flight:
                self._in_flight.remove(gen.completes_at)
                heapq.heapify(self._in_flight)
            return True

    # -- downloads -----------------------------------------------------------
    def authorize_download(self, gen_id: str, expires: str, signature: str,
                           count: bool = True) -> VideoFile:
        """Check a signed file URL and count the download, or raise DownloadDenied."""
        if not expires.isdigit() or not hmac.compare_digest(sign(gen_id, int(expires)), signature):
            raise DownloadDenied(403, "SignatureDoesNotMatch",
                                 "The request signature we calculated does not match.")
        now = time.time()
        with self._lock:
            gen = self._generations.get(gen_id)
        if gen is None or gen.forgotten or not gen.is_downloadable(now):
            raise DownloadDenied(404, "NoSuchKey", "The specified key does not exist.")
        if int(expires) <= now or int(expires) in gen.revoked_expires:
            raise DownloadDenied(403, "AccessDenied", "Request has expired.")
        self._attach_video_if_done(gen)
        if count:  # HEAD requests check a link without downloading
            with self._lock:
                gen.downloads += 1
                self._stats["downloads"] += 1
        assert gen.video is not None  # attached above: the generation is downloadable
        return gen.video

    # -- faults --------------------------------------------------------------
    def add_faults(self, spec: dict) -> dict:
        retry_after = spec.get("retry_after", 1)
        retry_after = None if retry_after is None else int(retry_after)
        with self._lock:
            for kind in FAULT_KINDS:
                for status in spec.get(kind, []):
                    self._faults[kind].append(Fault(int(status), retry_after))
            return {kind: [f.status for f in queue] for kind, queue in self._faults.items()}

    def take_fault(self, kind: str) -> Fault | None:
        with self._lock:
            queue = self._faults[kind]
            return queue.popleft() if queue else None

    # -- introspection -------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            self._prune_in_flight(time.time())
            duplicates = sum(1 for count in self._prompt_counts.values() if count > 1)
            stats = {**self._stats, "in_flight": len(self._in_flight),
                     "duplicate_prompts": duplicates}
            return {name: stats[name] for name in STATS_ORDER}

    def ledger(self) -> list[dict]:
        with self._lock:
            generations = list(self._generations.values())
        for gen in generations:  # completed files must show size and hash
            self._attach_video_if_done(gen)
        now = time.time()
        with self._lock:
            return [self._ledger_entry(gen, now) for gen in generations]

    @staticmethod
    def _ledger_entry(gen: Generation, now: float) -> dict:
        return {
            "id": gen.id, "prompt": gen.prompt, "body": gen.body, "endpoint": gen.endpoint,
            "status": gen.status(now), "submitted_at": gen.submitted_at,
            "completes_at": gen.completes_at, "polls": gen.polls, "downloads": gen.downloads,
            "size": gen.video.size if gen.video else None,
            "sha256": gen.video.sha256 if gen.video else None,
        }
