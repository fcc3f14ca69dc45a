"""Where finished videos go. Local disk today; the interface is kept small
(`writer`, `put_bytes`, `exists`, `location`) so other backends fit.

A reader never sees a partial file: bytes go to a hidden temporary name in
the same directory, are fsynced, then renamed into place.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from .errors import ConfigError, StorageError

# Published files get the mode a plain open() would give them (mkstemp's 0600
# would hide videos from the group reading the shared storage directory).
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


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
    def writer(self, key: str) -> Iterator[BinaryIO]:
        """A file to write; published under `key` only if the block succeeds."""
        final = self.path(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".part")
        except OSError as exc:
            raise StorageError(f"cannot write {final}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    yield out
                except OSError as exc:  # ENOSPC, EIO while the caller writes
                    raise StorageError(f"cannot write {final}: {exc.strerror}") from None
                try:
                    out.flush()
                    os.fchmod(out.fileno(), FILE_MODE)
                    os.fsync(out.fileno())
                except OSError as exc:
                    raise StorageError(f"cannot write {final}: {exc.strerror}") from None
            try:
                os.replace(tmp, final)
                _fsync_dir(final.parent)
            except OSError as exc:
                raise StorageError(f"cannot publish {final}: {exc.strerror}") from None
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        with self.writer(key) as out:
            out.write(data)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

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


def open_storage(url: str) -> FileStorage:
    """The backend for VIDQ_STORAGE_URL (file:///abs/path, or a plain path)."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        raw = unquote(parsed.path) if parsed.scheme else url
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"VIDQ_STORAGE_URL={url!r}: use file:///absolute/path")
        return FileStorage(Path(raw).expanduser().resolve())
    raise ConfigError(f"VIDQ_STORAGE_URL={url!r}: unsupported scheme {parsed.scheme!r}")


def video_key(batch: str, job_id: str) -> str:
    return f"{batch}/{job_id}.mp4"


def sidecar_key(batch: str, job_id: str) -> str:
    return f"{batch}/{job_id}.json"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
