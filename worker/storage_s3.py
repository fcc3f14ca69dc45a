"""The S3 backend of `worker.storage`.

On S3 (boto3's default client: AWS_ENDPOINT_URL, AWS_PROFILE, credentials and
region come from the standard AWS environment and config files), `writer`
keeps an object smaller than one part (VIDQ_S3_PART_BYTES) in memory and
sends it with a single put_object; a larger one is spooled to an unnamed
temporary file ($TMPDIR) as it arrives and sent as a multipart upload, one
part in memory at a time, once the block ends. Spooled, the result's
download never waits on S3: uploading each part as it filled stopped
reading the result while S3 was slow, and a CDN that drops a client reading
nothing for a while (nginx's send_timeout) cut every try, so a paid video
was fetched again and again and never stored (review 140). Any exception
in the block, or in completing, aborts the upload, so nothing appears under
the key; after a completion, uploads of the same key that writers killed
mid-upload left open are aborted. Every object
carries Content-Type (video/mp4, application/json) and metadata job-id, batch
(from the key) and sha256 (of the object's bytes, hashed while streaming). A
single put_object sends the sha256 with the object; a multipart upload only
knows it at the end, so after completing, the object is copied onto itself
with the full metadata (MetadataDirective=REPLACE; server-side, no bytes
re-sent), only if it is still the object that upload made. `sha256(key)`
reads that metadata, and hashes the object only when it is absent (a failed
copy leaves the whole object as it is, undescribed: deleting it could lose a
paid video, or another writer's copy). The request that publishes the object
(the put_object, or the completion) runs `before_publish()` before each of
its tries, which vidq makes itself rather than botocore. botocore errors
become StorageError (retried by the download step). An upload whose
abort itself fails (storage gone mid-upload) stays open: give the bucket a
lifecycle rule AbortIncompleteMultipartUpload.
"""
from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath
from typing import Any

from .errors import ConfigError, StorageError
from .s3_upload import S3Upload, translated

DEFAULT_S3_PART_BYTES = 8 * 1024**2
_SHA256 = re.compile(r"[0-9a-f]{64}")


class S3Storage:
    """Objects under `s3://bucket/prefix/`; keys use '/' separators."""

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None,
                 part_bytes: int = DEFAULT_S3_PART_BYTES):
        # part_bytes below S3's 5 MiB minimum is only for tests that abort;
        # VIDQ_S3_PART_BYTES is checked by Settings.
        if part_bytes < 1:
            raise ConfigError("S3 part size must be positive")
        self.bucket, self.prefix, self.part_bytes = bucket, prefix.strip("/"), part_bytes
        self.client = self.publish_client = client
        if client is None:
            import boto3
            from botocore.config import Config

            self.client = boto3.client("s3", config=Config(retries={"mode": "standard"}))
            # The request that publishes an object is tried by S3Upload, which
            # checks before each try that it may still publish.
            self.publish_client = boto3.client(
                "s3", config=Config(retries={"mode": "standard", "total_max_attempts": 1}))

    def object_key(self, key: str) -> str:
        parts = PurePosixPath(key).parts
        if not parts or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise StorageError(f"storage key {key!r} leaves the storage prefix")
        return f"{self.prefix}/{key}" if self.prefix else key

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.object_key(key)}"

    def check(self) -> None:
        """Raise StorageError unless the bucket answers (exists, credentials work)."""
        with translated(f"cannot reach s3://{self.bucket}"):
            self.client.head_bucket(Bucket=self.bucket)

    @contextlib.contextmanager
    def writer(self, key: str, metadata: dict[str, str] | None = None,
               before_publish: Callable[[], None] | None = None) -> Iterator[S3Upload]:
        """An object to write (`.write(bytes)`); it exists under `key` only if
        the block and the upload succeed, else the multipart upload is aborted.
        `before_publish()` runs right before the request that publishes it."""
        upload = S3Upload(self, key, metadata, before_publish)
        try:
            yield upload
            upload.finish()
        except BaseException:
            upload.abort()
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        with self.writer(key) as out:
            out.write(data)

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def move(self, key: str, new_key: str) -> bool:
        """Copy `key` to `new_key` (type and metadata kept), then delete it;
        False (nothing moved) if `key` is not there or `new_key` is."""
        if not self.exists(key) or self.exists(new_key):
            return False
        with translated(f"cannot move {self.location(key)} to {self.location(new_key)}"):
            self.client.copy_object(Bucket=self.bucket, Key=self.object_key(new_key),
                                    CopySource={"Bucket": self.bucket,
                                                "Key": self.object_key(key)})
            self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))
        return True

    def read_bytes(self, key: str) -> bytes:
        where = self.location(key)
        with translated(f"cannot read {where}"):
            answer = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))
            with contextlib.closing(answer["Body"]) as body:
                return body.read()

    def sha256(self, key: str) -> str:
        """The sha256 recorded in the object's metadata, else hashed from its bytes."""
        head = self._head(key)
        if head is None:
            raise StorageError(f"cannot read {self.location(key)}: no such object")
        recorded = head.get("Metadata", {}).get("sha256", "")
        if _SHA256.fullmatch(recorded):
            return recorded
        digest = hashlib.sha256()
        with translated(f"cannot read {self.location(key)}"):
            answer = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))
            with contextlib.closing(answer["Body"]) as body:
                for block in body.iter_chunks(1 << 20):
                    digest.update(block)
        return digest.hexdigest()

    def metadata(self, key: str) -> dict[str, str]:
        """The object's user metadata (job-id, batch, sha256)."""
        head = self._head(key)
        if head is None:
            raise StorageError(f"cannot read {self.location(key)}: no such object")
        return dict(head.get("Metadata", {}))

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        with translated(f"cannot look up {self.location(key)}"):
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
            except ClientError as exc:
                # HEAD has no body: a missing key (or bucket) is a bare 404.
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
