"""Render, pad and cache the MP4 clips the sandbox serves as "generated" videos.

One clip is rendered per frame size and reused by every generation of that
shape: the content is irrelevant to clients, only that it is a real, playable
H.264 file of the size the request asked for.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import tempfile
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

FPS = 30
CLIP_SECONDS = 5
CHUNK_BYTES = 1024 * 1024

# Short side comes from the resolution, long side from the aspect ratio. The
# 480P 16:9 width (854) is what the provider documents, not 480*16/9 rounded.
FRAME_SIZES: dict[tuple[str, str], tuple[int, int]] = {
    ("720P", "16:9"): (1280, 720),
    ("720P", "9:16"): (720, 1280),
    ("720P", "1:1"): (720, 720),
    ("720P", "4:3"): (960, 720),
    ("720P", "3:4"): (720, 960),
    ("480P", "16:9"): (854, 480),
    ("480P", "9:16"): (480, 854),
    ("480P", "1:1"): (480, 480),
    ("480P", "4:3"): (640, 480),
    ("480P", "3:4"): (480, 640),
}
DEFAULT_SHAPE = ("720P", "16:9")


@dataclass(frozen=True)
class VideoFile:
    path: Path
    size: int
    sha256: str


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "vidq-sandbox"


def frame_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    return FRAME_SIZES[(resolution, aspect_ratio)]


def _luma_plane(width: int, height: int, line_size: int, index: int) -> bytes:
    """A bright vertical bar sliding right over a band sliding down."""
    bar_w, band_h = max(8, width // 16), max(8, height // 12)
    bar_x = (index * 9) % (width - bar_w)
    band_y = (index * 5) % (height - band_h)
    plain, band = bytearray(b"\x30" * line_size), bytearray(b"\x90" * line_size)
    plain[bar_x:bar_x + bar_w] = band[bar_x:bar_x + bar_w] = b"\xeb" * bar_w
    rest = height - band_y - band_h
    return bytes(plain) * band_y + bytes(band) * band_h + bytes(plain) * rest


def _make_frame(width: int, height: int, index: int) -> av.VideoFrame:
    frame = av.VideoFrame(width, height, "yuv420p")
    luma, cb, cr = frame.planes
    luma.update(_luma_plane(width, height, luma.line_size, index))
    # Slow colour drift so the clip is visibly moving even in a thumbnail.
    phase = 2 * math.pi * index / (FPS * CLIP_SECONDS)
    cb.update(bytes([128 + int(50 * math.sin(phase))]) * cb.buffer_size)
    cr.update(bytes([128 + int(50 * math.cos(phase))]) * cr.buffer_size)
    frame.pts = index
    frame.time_base = Fraction(1, FPS)
    return frame


def render_clip(path: Path, width: int, height: int) -> None:
    """Encode the test-pattern clip to `path` (H.264, yuv420p, faststart)."""
    with av.open(str(path), "w", format="mp4",
                 options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=FPS,
                                      options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(FPS * CLIP_SECONDS):
            container.mux(stream.encode(_make_frame(width, height, index)))
        container.mux(stream.encode(None))


def append_free_box(source: Path, target: Path, total_size: int) -> None:
    """Copy `source` and pad it with a top-level `free` box to `total_size`."""
    padding = total_size - source.stat().st_size
    with open(source, "rb") as src, open(target, "wb") as dst:
        while chunk := src.read(CHUNK_BYTES):
            dst.write(chunk)
        if padding >= 2**32:  # needs the 64-bit "largesize" box header
            dst.write(struct.pack(">I4sQ", 1, b"free", padding))
            payload = padding - 16
        else:
            dst.write(struct.pack(">I4s", padding, b"free"))
            payload = padding - 8
        zeros = bytes(CHUNK_BYTES)
        while payload > 0:
            dst.write(zeros[:min(payload, CHUNK_BYTES)])
            payload -= CHUNK_BYTES


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class VideoCache:
    """On-disk cache of rendered clips, safe across threads and processes.

    Files are written under a temporary name and renamed into place, so a
    concurrently running sandbox never sees a half-written clip.
    """

    def __init__(self, cache_dir: Path, pad_to: int = 0):
        self.cache_dir = Path(cache_dir)
        self.pad_to = pad_to
        self._lock = threading.Lock()
        self._shape_locks: dict[tuple[int, int], threading.Lock] = {}
        self._ready: dict[tuple[int, int], VideoFile] = {}
        self._scheduled: set[tuple[int, int]] = set()

    def get(self, width: int, height: int) -> VideoFile:
        """Return the served file for this frame size, rendering if needed."""
        key = (width, height)
        with self._lock:
            if key in self._ready:
                return self._ready[key]
            shape_lock = self._shape_locks.setdefault(key, threading.Lock())
        with shape_lock:  # one render per shape even under concurrent polls
            if key not in self._ready:
                path = self._ensure_file(width, height)
                video = VideoFile(path, path.stat().st_size, _sha256_of(path))
                with self._lock:
                    self._ready[key] = video
        return self._ready[key]

    def prepare_async(self, width: int, height: int) -> None:
        """Start rendering in the background so the first poll is fast."""
        with self._lock:  # one background thread per shape, however many submits
            if (width, height) in self._ready or (width, height) in self._scheduled:
                return
            self._scheduled.add((width, height))
        threading.Thread(target=self.get, args=(width, height),
                             name=f"render-{width}x{height}", daemon=True).start()

    def _ensure_file(self, width: int, height: int) -> Path:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        plain = self.cache_dir / f"{width}x{height}.mp4"
        if not plain.exists():
            self._atomic_write(plain, lambda tmp: render_clip(tmp, width, height))
        # A pad target too small to hold even a box header is ignored.
        if self.pad_to <= 0 or self.pad_to < plain.stat().st_size + 8:
            return plain
        padded = self.cache_dir / f"{width}x{height}-{self.pad_to}.mp4"
        if not padded.exists():
            self._atomic_write(
                padded, lambda tmp: append_free_box(plain, tmp, self.pad_to))
        return padded

    def _atomic_write(self, final: Path, write) -> None:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=".mp4.tmp",
                                        dir=self.cache_dir)
        os.close(fd)
        try:
            write(Path(tmp_name))
            os.chmod(tmp_name, 0o644)  # mkstemp's 0600 would hide it from other users
            os.replace(tmp_name, final)
        except BaseException:
            os.unlink(tmp_name)
            raise
