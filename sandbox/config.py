"""Configuration of one sandbox instance."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sandbox.videos import default_cache_dir


@dataclass(frozen=True)
class SandboxConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 lets the OS pick a free port; read it back from SandboxServer.url
    api_key: str = "sandbox-key"
    # Simulated time runs this many times faster than the wall clock: durations
    # and URL lifetimes are divided by it.
    time_scale: float = 1.0
    max_concurrency: int = 2  # in-flight generations before 429; <= 0 means unlimited
    # POSTs in any one second of the wall clock (not scaled) before 429, as
    # the provider documents 2; <= 0 means unlimited.
    max_submits_per_s: int = 0
    mean_generation_s: float = 90.0
    spread: float = 0.1  # standard deviation as a fraction of the mean
    reject_substring: str = "REJECT"  # prompts containing it end in status "error"; "" disables
    # The status word a rejected generation ends in: "error" for this model;
    # other models answer "failed", and an upstream may add words of its own.
    failed_status: str = "error"
    url_ttl_s: float = 86400.0
    pad_video_to: int = 0  # bytes; > 0 pads served files with an MP4 `free` box
    cache_dir: str | os.PathLike | None = None  # None: $XDG_CACHE_HOME or ~/.cache, /vidq-sandbox
    seed: int | None = None  # seeds generation durations, for reproducible benchmarks
    log_requests: bool = False  # one access-log line per request on stderr
    # Where created generations are kept, so a restarted sandbox still knows
    # them (sandbox/journal.py); None: in memory only.
    journal_path: str | os.PathLike | None = None

    def __post_init__(self):
        if self.time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        if self.mean_generation_s <= 0:
            raise ValueError("mean_generation_s must be > 0")
        if self.spread < 0 or self.url_ttl_s < 0 or self.pad_video_to < 0:
            raise ValueError("spread, url_ttl_s and pad_video_to must be >= 0")

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir is None:
            return default_cache_dir()
        return Path(self.cache_dir).expanduser()
