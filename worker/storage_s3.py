"""The S3 backend of `worker.storage`.

On S3 (boto3's default client: AWS_ENDPOINT_URL, AWS_PROFILE, credentials and
region come from the standard AWS environment and config files), `writer`
buffers at most one part (VIDQ_S3_PART_BYTES) and streams a multipart upload;
an object smaller than one part is sent with a single put_object. Any
exception in the block, or in completing, aborts the upload, so nothing
appears under the key and no multipart upload is left open. Every object
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
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath
from typing import Any

from .errors import ConfigError, StorageError

log = logging.getLogger(__name__)

DEFAULT_S3_PART_BYTES = 8 * 1024**2
# Pauses between the tries of an object's publishing request (botocore's
# standard mode would make 3 tries with backoff).
PUBLISH_RETRY_S = (0.5, 2.0)
# copy_object (used to attach the sha256 after a multipart upload) stops here;
# larger objects keep their other metadata and are hashed when asked.
_S3_COPY_LIMIT = 5 * 1024**3
# .jsonl: a batch's manifest and errors (worker/manifest.py).
_CONTENT_TYPES = {".mp4": "video/mp4", ".json": "application/json",
                  ".jsonl": "application/x-ndjson"}
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
            # The request that publishes an object is tried by _S3Upload, which
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
        with _translated(f"cannot reach s3://{self.bucket}"):
            self.client.head_bucket(Bucket=self.bucket)

    @contextlib.contextmanager
    def writer(self, key: str, metadata: dict[str, str] | None = None,
               before_publish: Callable[[], None] | None = None) -> Iterator[_S3Upload]:
        """An object to write (`.write(bytes)`); it exists under `key` only if
        the block and the upload succeed, else the multipart upload is aborted.
        `before_publish()` runs right before the request that publishes it."""
        upload = _S3Upload(self, key, metadata, before_publish)
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
        with _translated(f"cannot move {self.location(key)} to {self.location(new_key)}"):
            self.client.copy_object(Bucket=self.bucket, Key=self.object_key(new_key),
                                    CopySource={"Bucket": self.bucket,
                                                "Key": self.object_key(key)})
            self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))
        return True

    def read_bytes(self, key: str) -> bytes:
        where = self.location(key)
        with _translated(f"cannot read {where}"):
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
        with _translated(f"cannot read {self.location(key)}"):
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

        with _translated(f"cannot look up {self.location(key)}"):
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
            except ClientError as exc:
                # HEAD has no body: a missing key (or bucket) is a bare 404.
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise


class _S3Upload:
    """One object being written: at most one part buffered at a time."""

    def __init__(self, storage: S3Storage, key: str, metadata: dict[str, str] | None,
                 before_publish: Callable[[], None] | None = None):
        self.storage, self.key = storage, storage.object_key(key)
        self.before_publish = before_publish or (lambda: None)
        self.where = storage.location(key)
        suffix = PurePosixPath(key).suffix
        self.content_type = _CONTENT_TYPES.get(suffix, "application/octet-stream")
        self.metadata = {**_key_metadata(key), **(metadata or {})}
        self.buffer = bytearray()
        self.digest = hashlib.sha256()
        self.size = 0
        self.upload_id: str | None = None
        self.parts: list[dict] = []
        self.completed = False

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += len(view)
        part = self.storage.part_bytes
        while view:
            take = part - len(self.buffer)
            self.buffer += view[:take]
            view = view[take:]
            if len(self.buffer) >= part:
                self._upload_part()
        return len(data)

    def finish(self) -> None:
        client, bucket = self.storage.client, self.storage.bucket
        metadata = {**self.metadata, "sha256": self.digest.hexdigest()}
        if self.upload_id is None:
            self._publish(f"cannot write {self.where}", lambda publisher: publisher.put_object(
                Bucket=bucket, Key=self.key, Body=bytes(self.buffer),
                ContentType=self.content_type, Metadata=metadata))
            return
        if self.buffer:
            self._upload_part()
        completed = self._publish(
            f"cannot complete {self.where}", lambda publisher: publisher.complete_multipart_upload(
                Bucket=bucket, Key=self.key, UploadId=self.upload_id,
                MultipartUpload={"Parts": self.parts}))
        self.completed = True
        if self.size > _S3_COPY_LIMIT:
            return
        try:
            with _translated(f"cannot record the sha256 of {self.where}"):
                client.copy_object(
                    Bucket=bucket, Key=self.key, CopySource={"Bucket": bucket, "Key": self.key},
                    # Only onto these bytes: a writer that stood still after
                    # completing must not describe another's object as its own.
                    CopySourceIfMatch=completed["ETag"],
                    MetadataDirective="REPLACE", ContentType=self.content_type,
                    Metadata=metadata)
        except StorageError as exc:
            # The object is whole (completed); only its description is
            # missing, and `sha256` hashes its bytes then. Never delete it: it
            # may be a paid video no longer served, or another writer's.
            log.warning("%s is stored whole, without its sha256 metadata: %s", self.where, exc)

    def _publish(self, what: str, request: Callable[[Any], dict]) -> dict:
        """The request that makes the object visible, tried up to 3 times,
        `before_publish()` before each: botocore's own retries would send it
        again after a pause (a 503's backoff, a frozen VM) in which the step
        may have been taken over (review 103)."""
        for pause in (*PUBLISH_RETRY_S, None):
            self.before_publish()
            try:
                with _translated(what):
                    return request(self.storage.publish_client)
            except StorageError:
                if pause is None:
                    raise
                time.sleep(pause)
        raise AssertionError("unreachable")

    def abort(self) -> None:
        if self.upload_id is None or self.completed:
            return
        try:
            self.storage.client.abort_multipart_upload(
                Bucket=self.storage.bucket, Key=self.key, UploadId=self.upload_id)
        except Exception as exc:
            log.warning("could not abort the multipart upload of %s: %s", self.where,
                        _describe(exc))

    def _upload_part(self) -> None:
        client, bucket = self.storage.client, self.storage.bucket
        if self.upload_id is None:
            with _translated(f"cannot write {self.where}"):
                answer = client.create_multipart_upload(
                    Bucket=bucket, Key=self.key, ContentType=self.content_type,
                    Metadata=self.metadata)
            self.upload_id = answer["UploadId"]
        number = len(self.parts) + 1
        with _translated(f"cannot write {self.where} (part {number})"):
            answer = client.upload_part(Bucket=bucket, Key=self.key, UploadId=self.upload_id,
                                        PartNumber=number, Body=bytes(self.buffer))
        self.parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        self.buffer.clear()


def _key_metadata(key: str) -> dict[str, str]:
    """job-id and batch from the layout `<batch>/<job_id>.<ext>`."""
    path = PurePosixPath(key)
    if len(path.parts) != 2:
        return {}
    return {"job-id": path.stem, "batch": path.parts[0]}


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """botocore's errors as StorageError, with the S3 code and message only."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        raise StorageError(f"{what}: {_describe(exc)}") from None


def _describe(exc: Exception) -> str:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        text = f"{error.get('Code', '?')}: {error.get('Message', '')}".rstrip(": ")
    else:
        text = f"{type(exc).__name__}: {exc}"
    # Never echo credentials a URL might carry.
    return re.sub(r"//[^/@\s]+@", "//***@", text)


