"""Where finished videos go: a local directory (file://) or an S3 bucket
(s3://bucket/prefix). Both backends have the same small interface (`writer`,
`put_bytes`, `exists`, `read_bytes`, `sha256`, `location`) and the same key
layout, `<batch>/<job_id>.mp4` and `<batch>/<job_id>.json` under the root or
prefix.

A reader never sees a partial object. On disk, bytes go to a hidden
temporary name in the same directory, are fsynced, then renamed into place.

The S3 backend lives in `worker.storage_s3`.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote, urlparse

from .errors import ConfigError, StorageError
from .netguard import without_credentials

log = logging.getLogger(__name__)

# Published files get the mode a plain open() would give them (mkstemp's 0600
# would hide videos from the group reading the shared storage directory).
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


# A temporary file untouched this long was left by a writer that died (a
# SIGKILLed pool child): a live one writes to it at least every chunk.
STALE_PART_S = 3600.0


def _remove_stale_parts(final: Path) -> list[Path]:
    """Each killed writer would leave up to a whole video behind: remove the
    parts of `final` untouched for STALE_PART_S, and return the younger ones.
    They may be a live writer's, who may still own the job; once this write
    publishes `final`, they are of writers that lost it (their publish is
    refused), and go too (one directory scan a write: a batch's directory
    holds thousands of files)."""
    now, young = time.time(), []
    # mkstemp's random part is 8 characters: `.*.part` also matched the parts
    # of another key whose name starts with this one's (job `a.mp4`; review 110).
    for part in final.parent.glob(f".{glob.escape(final.name)}.{'?' * 8}.part"):
        with contextlib.suppress(OSError):
            if now - part.stat().st_mtime > STALE_PART_S:
                part.unlink()
            else:
                young.append(part)
    return young


class FileStorage:
    """Objects as files under one root directory; keys use '/' separators."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise StorageError(f"storage key {key!r} leaves the storage root")
        return path

    @contextlib.contextmanager
    def writer(self, key: str, metadata: dict[str, str] | None = None,
               before_publish: Callable[[], None] | None = None) -> Iterator[BinaryIO]:
        """A file to write; published under `key` only if the block succeeds.
        `metadata` is accepted for parity with S3Storage; files carry none.
        `before_publish()` runs once the file is on disk, right before it is
        published: its exception leaves nothing published."""
        final = self.path(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            others = _remove_stale_parts(final)
            fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".part")
        except OSError as exc:
            raise StorageError(f"cannot write {final}: {exc.strerror}") from None
        try:
            try:
                with os.fdopen(fd, "wb") as out:
                    yield out
                    out.flush()
                    os.fchmod(out.fileno(), FILE_MODE)
                    os.fsync(out.fileno())
            except OSError as exc:
                # ENOSPC, EIO while the caller writes, or again as the close
                # flushes what the buffer still held: a StorageError either
                # way, which a paid video's download retries.
                raise StorageError(f"cannot write {final}: {exc.strerror}") from None
            if before_publish is not None:
                before_publish()
            try:
                os.replace(tmp, final)
                fsync_dir(final.parent)
            except OSError as exc:
                raise StorageError(f"cannot publish {final}: {exc.strerror}") from None
            for part in others:
                with contextlib.suppress(OSError):
                    part.unlink()
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        with self.writer(key) as out:
            out.write(data)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def move(self, key: str, new_key: str) -> bool:
        """Rename `key` to `new_key`, never replacing it; False (nothing moved)
        if `key` is not there or `new_key` is."""
        source, target = self.path(key), self.path(new_key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, target)  # fails if the target exists, unlike a rename
            os.unlink(source)
            fsync_dir(target.parent)
            fsync_dir(source.parent)
        except (FileNotFoundError, FileExistsError):
            return False
        except OSError as exc:
            raise StorageError(f"cannot move {source} to {target}: {exc.strerror}") from None
        return True

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {key}: {exc.strerror}") from None

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        try:
            with open(self.path(key), "rb") as source:
                for block in iter(lambda: source.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            raise StorageError(f"cannot read {key}: {exc.strerror}") from None
        return digest.hexdigest()

    def location(self, key: str) -> str:
        return str(self.path(key))

    def check(self) -> None:
        """Raise StorageError unless videos can be written under the root now."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.root}: {exc.strerror}") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"cannot write in {self.root}: permission denied")


class Storage(Protocol):
    """What the steps need from a backend."""

    def writer(self, key: str, metadata: dict[str, str] | None = None,
               before_publish: Callable[[], None] | None = None
               ) -> contextlib.AbstractContextManager[Any]: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def exists(self, key: str) -> bool: ...
    def move(self, key: str, new_key: str) -> bool: ...
    def read_bytes(self, key: str) -> bytes: ...
    def sha256(self, key: str) -> str: ...
    def location(self, key: str) -> str: ...
    def check(self) -> None: ...


BUCKET = re.compile(r"[A-Za-z0-9._-]+")


def check_storage_url(url: str) -> None:
    """ConfigError unless VIDQ_STORAGE_URL is file:///abs/path, a plain path or
    s3://bucket/prefix: every command checks it with its settings, not only
    the workers when they first store a video."""
    shown = without_credentials(url) if "://" in url else url
    try:
        parsed = urlparse(url)
    except ValueError:  # an unclosed '[': its text may quote the URL
        raise ConfigError(f"VIDQ_STORAGE_URL={shown!r} is malformed: use a path, "
                          "file:///absolute/path or s3://bucket/prefix") from None
    if parsed.scheme in ("", "file"):
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"VIDQ_STORAGE_URL={shown!r}: use file:///absolute/path")
    elif parsed.scheme == "s3":
        # A bucket name is all the netloc holds: a port, a space or userinfo
        # there failed only at the first video stored, after it was paid for.
        if not BUCKET.fullmatch(parsed.netloc) or parsed.query or parsed.fragment:
            raise ConfigError(f"VIDQ_STORAGE_URL={shown!r}: use s3://bucket/prefix (a bucket "
                              "name is letters, digits, '.', '-' and '_')")
    else:
        raise ConfigError(f"VIDQ_STORAGE_URL={shown!r}: unsupported scheme {parsed.scheme!r}; "
                          "use a path, file:///absolute/path or s3://bucket/prefix")


def open_storage(url: str, part_bytes: int) -> Storage:
    """The backend for VIDQ_STORAGE_URL (check_storage_url); S3 multipart parts
    of `part_bytes` (VIDQ_S3_PART_BYTES)."""
    check_storage_url(url)
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        from .storage_s3 import S3Storage

        return S3Storage(parsed.netloc, unquote(parsed.path), part_bytes=part_bytes)
    raw = unquote(parsed.path) if parsed.scheme else url
    return FileStorage(Path(raw).expanduser().resolve())


def video_key(batch: str, job_id: str) -> str:
    return f"{batch}/{job_id}.mp4"


def sidecar_key(batch: str, job_id: str) -> str:
    return f"{batch}/{job_id}.json"


def fsync_dir(directory: Path) -> None:
    """Make a new or renamed entry of `directory` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
