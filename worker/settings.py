"""Configuration, read once from the environment and passed down.

Every name is documented in README.md and .env.example. Nothing else in vidq
reads os.environ for its behaviour.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from .contract import CREDITS_PER_VIDEO_ESTIMATE, DEFAULT_BASE_URL, ENDPOINTS
from .errors import ConfigError
from .netguard import host_problem, redacted, without_credentials
from .redis_url import check_redis_url, sentinel_url
from .spend import parse_estimates
from .storage import check_storage_url
from .webhook_signing import check_webhook_settings

# S3's limits on a multipart upload's parts (all but the last).
S3_MIN_PART_BYTES = 5 * 1024**2
S3_MAX_PART_BYTES = 5 * 1024**3


# Counts below 1 stop the work outright: no slot, no try, no byte of a video.
AT_LEAST_ONE = ("max_in_flight", "max_attempts", "max_video_bytes", "events_maxlen")
# Durations that must be above 0 (VIDQ_MAX_SUBMITS_PER_S, VIDQ_RETENTION_S and
# VIDQ_WEBHOOK_RETRY_FOR_S take 0). At 0 or below a timer spins (heartbeats,
# the reconciler), polls and retries come back to back (375 status GETs for
# two videos at VIDQ_POLL_MIN_INTERVAL_S=-1), or every POST fails before it is
# sent (an HTTP timeout of 0) yet counts as perhaps paid.
ABOVE_ZERO = ("expected_generation_s", "poll_min_interval_s", "poll_max_interval_s",
              "deadline_s", "overdue_poll_interval_s", "backoff_base_s", "backoff_cap_s",
              "http_timeout_s", "reconcile_interval_s", "heartbeat_interval_s", "step_grace_s",
              "download_grace_s", "post_deadline_s", "webhook_backoff_base_s",
              "webhook_timeout_s")


@dataclass(frozen=True)
class Settings:
    """Everything a worker or the producer needs to know; units in names."""

    api_key: str | None = field(default=None, repr=False)
    base_url: str = DEFAULT_BASE_URL
    redis_url: str = "redis://127.0.0.1:6379/0"
    # With `VIDQ_REDIS_URL=sentinel://h1:26379;sentinel://h2:26379;...`: the name
    # the sentinels monitor. It is folded into redis_url as `?master_name=`, so
    # every client built from the URL alone (broker, job store) finds the master.
    redis_sentinel_master: str = ""
    storage_url: str = ""
    endpoint: str = "universal"
    max_in_flight: int = 2
    # POSTs per second the account allows (the provider documents 2); 0: no limit.
    max_submits_per_s: float = 2.0
    # First poll of a generation before any has completed; later learned.
    expected_generation_s: float = 90.0
    # Low enough that a 5 s generation is still found within ~10% of its time;
    # the learned plan, not this floor, keeps GETs near two per video.
    poll_min_interval_s: float = 0.5
    # Well above any generation time seen (~90 s), so a first poll aimed at a
    # 4-minute generation is one countdown, not two.
    poll_max_interval_s: float = 600.0
    # Still pending this long after submit: the job is overdue and polled
    # slowly; past the hard limit it fails, keeping its generation id.
    deadline_s: float = 1000.0
    hard_limit_s: float = 86400.0
    overdue_poll_interval_s: float = 60.0
    max_attempts: int = 8
    backoff_base_s: float = 2.0
    backoff_cap_s: float = 120.0
    http_timeout_s: float = 30.0
    # Longer than any countdown or task run, so Redis never redelivers early.
    visibility_timeout_s: int = 1800
    reconcile_interval_s: float = 5.0
    # A worker refreshes its liveness key this often; the key lives 3 times as
    # long, so a killed worker's steps are re-sent within ~3 x this + reconcile.
    heartbeat_interval_s: float = 2.0
    # A step not started this long after it fell due is sent again.
    step_grace_s: float = 90.0
    download_grace_s: float = 900.0
    # A submit's POST, from connect to the last byte of its answer.
    post_deadline_s: float = 60.0
    # Result URLs may point at these hosts/CIDRs even if private (comma-separated).
    result_url_allowlist: str = ""
    max_video_bytes: int = 2 * 1024**3
    # s3:// storage: bytes buffered per multipart part (S3's minimum is 5 MiB).
    s3_part_bytes: int = 8 * 1024**2
    # A finished batch whose manifest is in storage leaves Redis this long
    # after the manifest was written (`vidq report` then reads the manifest).
    retention_s: float = 7 * 86400.0
    # Credits a generation is expected to cost until the upstream reports it
    # (the spend caps count these); per model@resolution in credit_estimates.
    credit_estimate: float = CREDITS_PER_VIDEO_ESTIMATE
    credit_estimates: str = ""
    # The event stream (worker.events) is trimmed to about this many entries:
    # a consumer further behind than that loses the oldest.
    events_maxlen: int = 100_000
    # Webhooks (worker.webhooks): the deployment's URL (every event), the
    # "whsec_..." secret that signs every delivery, hosts/CIDRs a webhook URL
    # may point at although private, and how long a failing one is retried.
    webhook_url: str = ""
    webhook_secret: str = field(default="", repr=False)
    webhook_allowlist: str = ""
    webhook_retry_for_s: float = 86400.0
    webhook_backoff_base_s: float = 5.0
    webhook_timeout_s: float = 10.0
    # Where a worker keeps a paid generation id until Redis has it
    # (worker/paid_journal.py): on a disk that outlives the worker process.
    journal_dir: str = ".vidq/journal"

    def __post_init__(self) -> None:
        # Frozen: the one field normalised here is written the dataclass way.
        object.__setattr__(self, "redis_url",
                           sentinel_url(self.redis_url, self.redis_sentinel_master))
        check_redis_url(self.redis_url)
        check_api_key(self.api_key)
        check_base_url(self.base_url)
        if self.endpoint not in ENDPOINTS:
            raise ConfigError(
                f"VIDQ_ENDPOINT={self.endpoint!r}: use one of {', '.join(ENDPOINTS)}"
            )
        self._check_ranges()
        if not 0 <= self.max_submits_per_s < math.inf:
            raise ConfigError("VIDQ_MAX_SUBMITS_PER_S must be a number >= 0 (0: no limit)")
        if self.marker_patience_s <= 0:
            raise ConfigError(
                "VIDQ_STEP_GRACE_S must exceed VIDQ_POST_DEADLINE_S + 5 s, or a slow "
                "but live submit would be taken over")
        if self.retention_s < 0:
            raise ConfigError("VIDQ_RETENTION_S must not be negative")
        if self.hard_limit_s < self.deadline_s:
            raise ConfigError("VIDQ_HARD_LIMIT_S must be at least VIDQ_DEADLINE_S")
        if self.credit_estimate < 0:
            raise ConfigError("VIDQ_CREDIT_ESTIMATE must not be negative")
        parse_estimates(self.credit_estimates)
        check_webhook_settings(self)
        check_storage_url(self.storage_url)
        if not S3_MIN_PART_BYTES <= self.s3_part_bytes <= S3_MAX_PART_BYTES:
            raise ConfigError(
                f"VIDQ_S3_PART_BYTES={self.s3_part_bytes}: S3 parts must be between "
                f"{S3_MIN_PART_BYTES} (5 MiB) and {S3_MAX_PART_BYTES} (5 GiB) bytes")
        longest = max(self.poll_max_interval_s, self.backoff_cap_s) + self.download_grace_s
        if self.visibility_timeout_s <= longest:
            raise ConfigError(
                "VIDQ_VISIBILITY_TIMEOUT_S must exceed the longest countdown "
                "(VIDQ_POLL_MAX_INTERVAL_S or VIDQ_BACKOFF_CAP_S) plus "
                f"VIDQ_DOWNLOAD_GRACE_S: {longest:.0f} s"
            )

    def _check_ranges(self) -> None:
        """A ConfigError for the first setting out of its range, naming its variable."""
        for name in AT_LEAST_ONE:
            if (count := getattr(self, name)) < 1:
                raise ConfigError(f"{ENV_NAMES[name]}={count}: must be at least 1")
        for name in ABOVE_ZERO:
            if not (seconds := getattr(self, name)) > 0:
                raise ConfigError(f"{ENV_NAMES[name]}={seconds:g}: must be above 0 (seconds)")
        if self.poll_min_interval_s > self.poll_max_interval_s:
            raise ConfigError(
                f"VIDQ_POLL_MIN_INTERVAL_S={self.poll_min_interval_s:g} is above "
                f"VIDQ_POLL_MAX_INTERVAL_S={self.poll_max_interval_s:g}: the shortest poll "
                "countdown cannot exceed the longest")

    @property
    def marker_patience_s(self) -> float:
        """How long the "POST started" marker is sent again through a Redis
        outage: what the submit's lease leaves past its POST's deadline, and
        a 5 s margin. At 0 or below, a slow but live submit would be taken over."""
        return self.step_grace_s - self.post_deadline_s - 5

    @property
    def heartbeat_ttl_s(self) -> float:
        return 3 * self.heartbeat_interval_s

    def grace_s(self, step: str) -> float:
        """How long a step may run (or wait past its time) before it is re-sent."""
        return self.download_grace_s if step == "download" else self.step_grace_s

    @property
    def worker_eta_task_limit(self) -> int:
        # Only generations holding a slot have countdown tasks, so a worker never
        # needs to hold many more than the cap. The margin covers retries, and a
        # re-aimed first poll (worker/reaim.py), whose superseded message stays
        # held until its old countdown: at 2C a lone worker stalled in a
        # simulated drift at C = 200 (it fetches nothing, not even downloads,
        # once at the limit). Not for a worker that also sends webhooks
        # (lifecycle.follow_eta_limit): their retries are countdowns too.
        return eta_task_limit(self.max_in_flight)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict = {}
        key = env.get("AIMLAPI_KEY") or env.get("AIML_API_KEY")
        if key:
            values["api_key"] = key.strip()
        if env.get("AIMLAPI_BASE_URL"):
            values["base_url"] = env["AIMLAPI_BASE_URL"].rstrip("/")
        values["storage_url"] = env.get("VIDQ_STORAGE_URL") or default_storage_url()
        for f in fields(cls):
            name = ENV_NAMES.get(f.name)
            if name and env.get(name, "").strip():
                values[f.name] = _parse(name, env[name].strip(), str(f.type))
        values["journal_dir"] = str(Path(values.get("journal_dir", cls.journal_dir)).resolve())
        return cls(**values)


ENV_NAMES = {
    "redis_url": "VIDQ_REDIS_URL",
    "redis_sentinel_master": "VIDQ_REDIS_SENTINEL_MASTER",
    "endpoint": "VIDQ_ENDPOINT",
    "max_in_flight": "VIDQ_MAX_IN_FLIGHT",
    "max_submits_per_s": "VIDQ_MAX_SUBMITS_PER_S",
    "expected_generation_s": "VIDQ_EXPECTED_GENERATION_S",
    "poll_min_interval_s": "VIDQ_POLL_MIN_INTERVAL_S",
    "poll_max_interval_s": "VIDQ_POLL_MAX_INTERVAL_S",
    "deadline_s": "VIDQ_DEADLINE_S",
    "max_attempts": "VIDQ_MAX_ATTEMPTS",
    "backoff_base_s": "VIDQ_BACKOFF_BASE_S",
    "backoff_cap_s": "VIDQ_BACKOFF_CAP_S",
    "http_timeout_s": "VIDQ_HTTP_TIMEOUT_S",
    "visibility_timeout_s": "VIDQ_VISIBILITY_TIMEOUT_S",
    "reconcile_interval_s": "VIDQ_RECONCILE_INTERVAL_S",
    "step_grace_s": "VIDQ_STEP_GRACE_S",
    "download_grace_s": "VIDQ_DOWNLOAD_GRACE_S",
    "hard_limit_s": "VIDQ_HARD_LIMIT_S",
    "overdue_poll_interval_s": "VIDQ_OVERDUE_POLL_INTERVAL_S",
    "heartbeat_interval_s": "VIDQ_HEARTBEAT_INTERVAL_S",
    "post_deadline_s": "VIDQ_POST_DEADLINE_S",
    "result_url_allowlist": "VIDQ_RESULT_URL_ALLOWLIST",
    "max_video_bytes": "VIDQ_MAX_VIDEO_BYTES",
    "s3_part_bytes": "VIDQ_S3_PART_BYTES",
    "retention_s": "VIDQ_RETENTION_S",
    "credit_estimate": "VIDQ_CREDIT_ESTIMATE",
    "credit_estimates": "VIDQ_CREDIT_ESTIMATES",
    "events_maxlen": "VIDQ_EVENTS_MAXLEN",
    "webhook_url": "VIDQ_WEBHOOK_URL",
    "webhook_secret": "VIDQ_WEBHOOK_SECRET",
    "webhook_allowlist": "VIDQ_WEBHOOK_ALLOWLIST",
    "webhook_retry_for_s": "VIDQ_WEBHOOK_RETRY_FOR_S",
    "webhook_backoff_base_s": "VIDQ_WEBHOOK_BACKOFF_BASE_S",
    "webhook_timeout_s": "VIDQ_WEBHOOK_TIMEOUT_S",
    "journal_dir": "VIDQ_JOURNAL_DIR",
}


def default_storage_url() -> str:
    return (Path.cwd() / "videos").resolve().as_uri()


def check_api_key(key: str | None) -> None:
    """ConfigError unless the key can go in an HTTP header as it is. A newline or
    a non-ASCII character (a copy-paste's no-break space or en dash) failed every
    POST inside the HTTP client, unsent, and each job ended "outcome unknown".
    The message names the character's place and kind, never the key."""
    for place, char in enumerate(key or "", start=1):
        if not char.isascii() or not char.isprintable():
            kind = "not ASCII" if not char.isascii() else "a control character (a line break?)"
            raise ConfigError(f"AIMLAPI_KEY (or AIML_API_KEY): character {place} of the key is "
                              f"{kind}: the Authorization header takes printable ASCII; "
                              "copy the key again")


def check_base_url(url: str) -> None:
    """ConfigError unless AIMLAPI_BASE_URL is http(s) with a host and port a
    request can use: a malformed one failed every job of the night instead.
    A gateway's password in it is taken out first, and never shown."""
    shown = without_credentials(url)
    problem = host_problem(shown)
    if not problem and urlsplit(shown).scheme.lower() not in ("http", "https"):
        problem = "not http(s)"
    if not problem and urlsplit(shown).path.rstrip("/").lower().endswith("/v2"):
        # The reference client's base URL: vidq's paths carry the /v2 (every
        # POST went to /v2/v2/... and each prompt failed on its 404; review 126).
        problem = "it ends in /v2, which vidq's paths already start with (/v2/video/...)"
    if problem:
        raise ConfigError(f"AIMLAPI_BASE_URL={redacted(shown)!r} is not a usable URL: {problem}; "
                          "use https://host[:port][/path]")


def _parse(name: str, raw: str, type_name: str):
    kind = {"int": int, "float": float}.get(str(type_name), str)
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if kind is float and not math.isfinite(value):
        # nan passes every "< 0" check and then breaks (or silently lifts) a limit.
        raise ConfigError(f"{name}={raw!r} is not a finite number")
    return value


def eta_task_limit(cap: int) -> int:
    """Countdown messages a worker may hold at C = `cap` (see above)."""
    return 3 * cap + 16
