"""The one exception hierarchy of vidq.

    VidqError
     +-- ConfigError                  bad or missing configuration
     +-- InputError                   a bad prompt file or CLI argument
     +-- UpstreamError                anything the upstream API did wrong
     |    +-- RetryableUpstreamError  try again later (backoff, or Retry-After)
     |    |    +-- UpstreamUnavailable   connection error, timeout, 5xx
     |    |    +-- RateLimited           429, carries retry_after seconds
     |    |    +-- BadResponse           a body that is not the documented JSON
     |    +-- PermanentUpstreamError  trying again cannot help
     |         +-- RequestRejected       400, 401, 403, 404 answered to an API call
     |         +-- GenerationFailed      the generation itself ended in error
     |         +-- ResultLinkExpired     403/404 on a result URL: poll again for a fresh one
     |         +-- SubmitOutcomeUnknown  a POST that may have created a generation we
     |         |                         cannot see: never re-sent on its own
     |         +-- ResultRefused         a result URL vidq will not fetch (scheme, private
     |                                   or metadata address, redirect there, too large)
     +-- MarkerUnconfirmed            Redis did not answer the "POST started" marker:
     |                                nothing was sent; the next try may take it over
     +-- StorageError                 the video could not be stored
          +-- CorruptVideo            not an MP4, or shorter/longer than announced
          +-- SidecarNotStored        the video is stored whole, its sidecar is not:
                                      a retry writes the sidecar, not the video again

HTTP answers and failures are translated into this tree in exactly one
place, `worker.upstream_errors`.
"""
from __future__ import annotations


class VidqError(Exception):
    """Base of every error vidq raises on purpose."""


class ConfigError(VidqError):
    """Raised when a setting is missing or invalid."""


class InputError(VidqError):
    """Raised when user input (a prompt file, a CLI argument) is invalid."""


class UpstreamError(VidqError):
    """Raised when a call to the upstream API did not succeed."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class RetryableUpstreamError(UpstreamError):
    """Raised when the same call may succeed later."""

    retry_after: float | None = None


class UpstreamUnavailable(RetryableUpstreamError):
    """Raised on connection errors, timeouts and 5xx answers."""

    never_sent: bool = False  # the host could not even be reached


class RateLimited(RetryableUpstreamError):
    """Raised on 429; `retry_after` is the server's Retry-After, if any."""

    def __init__(self, message: str, *, retry_after: float | None, status: int = 429):
        super().__init__(message, status=status)
        self.retry_after = retry_after


class BadResponse(RetryableUpstreamError):
    """Raised when a 2xx body is not the JSON the contract describes."""


class PermanentUpstreamError(UpstreamError):
    """Raised when retrying the same call cannot help."""


class RequestRejected(PermanentUpstreamError):
    """Raised on 400, 401, 403 or 404 from the API."""


class GenerationFailed(PermanentUpstreamError):
    """Raised when the upstream reports the generation ended in error."""


class ResultLinkExpired(PermanentUpstreamError):
    """Raised when a result URL answers 403/404: its signature has expired."""


class SubmitOutcomeUnknown(PermanentUpstreamError):
    """Raised when a submit may have been accepted (read timeout, unreadable 2xx)."""


class ResultRefused(PermanentUpstreamError):
    """Raised when a result URL is not safe to fetch (SSRF guard) or is too large."""


class MarkerUnconfirmed(VidqError):
    """Raised when the "POST started" marker's reply was lost; names its call."""

    def __init__(self, message: str, *, op: str):
        super().__init__(message)
        self.carried = {"unconfirmed_op": op}  # for the next try (Steps.retry)


class StorageError(VidqError):
    """Raised when a video or its sidecar cannot be stored."""


class CorruptVideo(StorageError):
    """Raised when downloaded bytes are not an MP4 or their length is wrong."""


class SidecarNotStored(StorageError):
    """Raised when a video is stored whole but its sidecar could not be written
    (the video was recorded on its job as it was published: the next try
    writes the sidecar, not the video again)."""
