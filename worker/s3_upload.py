"""One object being written to S3 (worker/storage_s3.py's `writer`): kept in
memory while under one part, else spooled to an unnamed temporary file and
sent as a multipart upload once whole; and botocore's errors as StorageError.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath
from typing import Any, BinaryIO

from .errors import StorageError

log = logging.getLogger(__name__)

# Pauses between the tries of an object's publishing request (botocore's
# standard mode would make 3 tries with backoff).
PUBLISH_RETRY_S = (0.5, 2.0)
# copy_object (used to attach the sha256 after a multipart upload) stops here;
# larger objects keep their other metadata and are hashed when asked.
S3_COPY_LIMIT = 5 * 1024**3
# .jsonl: a batch's manifest and errors (worker/manifest.py).
CONTENT_TYPES = {".mp4": "video/mp4", ".json": "application/json",
                 ".jsonl": "application/x-ndjson"}


class S3Upload:
    """One object being written: at most one part buffered at a time."""

    def __init__(self, storage: Any, key: str, metadata: dict[str, str] | None,
                 before_publish: Callable[[], None] | None = None):
        self.storage, self.key = storage, storage.object_key(key)
        self.before_publish = before_publish or (lambda: None)
        self.where = storage.location(key)
        suffix = PurePosixPath(key).suffix
        self.content_type = CONTENT_TYPES.get(suffix, "application/octet-stream")
        self.metadata = {**_key_metadata(key), **(metadata or {})}
        self.buffer = bytearray()  # the object while it is under one part
        self.spool: BinaryIO | None = None  # the object once it is not
        self.digest = hashlib.sha256()
        self.size = 0
        self.upload_id: str | None = None
        self.parts: list[dict] = []
        self.completed = False

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        try:
            if self.spool is not None:
                self.spool.write(data)
                self.spool.flush()
            elif len(self.buffer) + len(data) < self.storage.part_bytes:
                self.buffer += data
            else:
                self.spool = tempfile.TemporaryFile(prefix="vidq-s3-")
                self.spool.write(self.buffer)
                self.spool.write(data)
                self.spool.flush()
                self.buffer = bytearray()
        except OSError as exc:
            # Flushed with each write: a write that fails fails here, as a
            # StorageError (review 141: a full $TMPDIR's ENOSPC came back from
            # close(), an "unexpected" error that paused nothing). Not
            # gettempdir() below: with no usable directory it raises again.
            where = tempfile.tempdir or os.environ.get("TMPDIR") or "the temporary directory"
            raise StorageError(f"cannot spool {self.where} to {where}: "
                               f"{exc.strerror or exc}") from None
        return len(data)

    def finish(self) -> None:
        client, bucket = self.storage.client, self.storage.bucket
        metadata = {**self.metadata, "sha256": self.digest.hexdigest()}
        if self.spool is None:
            self._publish(f"cannot write {self.where}", lambda publisher: publisher.put_object(
                Bucket=bucket, Key=self.key, Body=bytes(self.buffer),
                ContentType=self.content_type, Metadata=metadata))
            return
        self._upload_parts()
        completed = self._publish(
            f"cannot complete {self.where}", lambda publisher: publisher.complete_multipart_upload(
                Bucket=bucket, Key=self.key, UploadId=self.upload_id,
                MultipartUpload={"Parts": self.parts}))
        self.completed = True
        self._abort_others()
        if self.size > S3_COPY_LIMIT:
            return
        try:
            with translated(f"cannot record the sha256 of {self.where}"):
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
                with translated(what):
                    return request(self.storage.publish_client)
            except StorageError:
                if pause is None:
                    raise
                time.sleep(pause)
        raise AssertionError("unreachable")

    def abort(self) -> None:
        self.close()
        if self.upload_id is None or self.completed:
            return
        try:
            self.storage.client.abort_multipart_upload(
                Bucket=self.storage.bucket, Key=self.key, UploadId=self.upload_id)
        except Exception as exc:
            log.warning("could not abort the multipart upload of %s: %s", self.where,
                        describe(exc))

    def close(self) -> None:
        if self.spool is not None:
            with contextlib.suppress(OSError):  # the error that ended it says why
                self.spool.close()

    def _upload_parts(self) -> None:
        """The spooled object, part by part, into a new multipart upload."""
        client, bucket, spool = self.storage.client, self.storage.bucket, self.spool
        assert spool is not None
        with translated(f"cannot write {self.where}"):
            answer = client.create_multipart_upload(
                Bucket=bucket, Key=self.key, ContentType=self.content_type,
                Metadata=self.metadata)
        self.upload_id = answer["UploadId"]
        while part := self._read_spool(spool, first=not self.parts):
            number = len(self.parts) + 1
            with translated(f"cannot write {self.where} (part {number})"):
                answer = client.upload_part(Bucket=bucket, Key=self.key,
                                            UploadId=self.upload_id, PartNumber=number, Body=part)
            self.parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        self.close()

    def _read_spool(self, spool: BinaryIO, first: bool) -> bytes:
        try:
            if first:
                spool.seek(0)
            return spool.read(self.storage.part_bytes)
        except OSError as exc:
            raise StorageError(f"cannot read back the spooled {self.where}: "
                               f"{exc.strerror}") from None

    def _abort_others(self) -> None:
        """Abort the key's other multipart uploads: a writer SIGKILLed (an OOM
        kill) mid-upload cannot abort its own, and its parts were kept and
        billed for good. This one owned the job when it published, so any
        other is a dead or taken-over copy's."""
        client, bucket = self.storage.client, self.storage.bucket
        try:
            listed = client.list_multipart_uploads(Bucket=bucket, Prefix=self.key)
            for upload in listed.get("Uploads", []):
                if upload["Key"] == self.key and upload["UploadId"] != self.upload_id:
                    client.abort_multipart_upload(Bucket=bucket, Key=self.key,
                                                  UploadId=upload["UploadId"])
        except Exception as exc:  # the object is stored; a lifecycle rule ends the rest
            log.warning("could not abort earlier uploads of %s: %s", self.where, describe(exc))


def _key_metadata(key: str) -> dict[str, str]:
    """job-id and batch from the layout `<batch>/<job_id>.<ext>`."""
    path = PurePosixPath(key)
    if len(path.parts) != 2:
        return {}
    return {"job-id": path.stem, "batch": path.parts[0]}


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """botocore's errors as StorageError, with the S3 code and message only."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        raise StorageError(f"{what}: {describe(exc)}") from None


def describe(exc: Exception) -> str:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        text = f"{error.get('Code', '?')}: {error.get('Message', '')}".rstrip(": ")
    else:
        text = f"{type(exc).__name__}: {exc}"
    # Never echo credentials a URL might carry.
    return re.sub(r"//[^/@\s]+@", "//***@", text)
