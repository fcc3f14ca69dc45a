"""Every failure of an upstream call as a `worker.errors` exception, here and
nowhere else: `http_errors` maps what `requests` raises (while sending, and
while a streamed body is read), `raise_for_submit` and `raise_for_response`
map HTTP statuses. The status line decides; a body that broke off is only
the message's loss.

A POST is sent again automatically only when the failure proves the upstream
created nothing (see the README's table):

    connection refused, connect timeout (no byte sent)   retry
    a header the client cannot send (nothing sent)       retry
    429, a 503 with a proxy's HTML page                  retry (429 after Retry-After)
    400-499 but 408, 429                                 rejected: the job fails, nothing paid
    408                                                  retry
    read timeout, reset or close after sending,
    500, 502, 504, other 5xx/3xx, 2xx without an id      outcome unknown: never re-sent
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import requests
import urllib3.exceptions

from .errors import (
    RateLimited,
    RequestRejected,
    ResultLinkExpired,
    ResultRefused,
    SubmitOutcomeUnknown,
    UpstreamError,
    UpstreamUnavailable,
)
from .netguard import redacted
from .retry_after import retry_after_s
from .upstream_text import BODY_READ_ERRORS, error_message

# Statuses on which the upstream surely created nothing, so a POST may be sent
# again; and a 503 from a proxy in front of it (an HTML page, not the API's
# JSON error body: CONTRACT.md, "a 5xx from a proxy may be HTML"). The API's own 503 is
# one more 5xx: the contract does not say it created nothing, and sent again
# it could pay twice (review 126).
SUBMIT_RETRY_STATUSES = frozenset({408, 429})
NEVER_SENT = (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError)
BAD_URL = (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
           requests.exceptions.InvalidSchema)


def never_sent(exc: requests.RequestException) -> bool:
    """True when the request surely did not reach the upstream."""
    if isinstance(exc, requests.ConnectTimeout | requests.exceptions.InvalidURL):
        return True
    if isinstance(exc, requests.exceptions.InvalidHeader):
        # Raised while the request was built (a key with a newline) it has no
        # request; an answer's bad header (Content-Length: 5, 6) comes with the
        # request it answered, sent and perhaps paid.
        return exc.request is None
    if isinstance(exc, requests.ConnectionError) and exc.args:
        reason = getattr(exc.args[0], "reason", exc.args[0])
        return isinstance(reason, NEVER_SENT)
    return False


@contextlib.contextmanager
def http_errors(action: str, *, posting: bool = False, result_url: str = "") -> Iterator[None]:
    """Map every `requests` failure inside the block to the error hierarchy."""
    try:
        yield
    except urllib3.exceptions.HTTPError as exc:  # a body read raw, or one not decoded
        where = f" {redacted(result_url)}" if result_url else ""
        if posting:
            # Raised while an answer was read (requests wraps what comes
            # before it): the POST was sent (review 130: a 502 whose gzip
            # body could not be decoded was POSTed again, and paid twice).
            raise SubmitOutcomeUnknown(f"{action}: the request was sent, its answer unreadable "
                                       f"({type(exc).__name__}); not re-sent, to avoid "
                                       "paying twice") from None
        raise UpstreamUnavailable(f"{action}{where} failed: {type(exc).__name__}") from None
    except UnicodeEncodeError:
        # http.client encodes a request's line and headers before it writes a
        # byte (a key holding an en dash). Any other ValueError is not known
        # to come before the send, so a POST's stays "outcome unknown".
        unsent = UpstreamUnavailable(f"{action}: not sent (UnicodeEncodeError)")
        unsent.never_sent = True
        raise unsent from None
    except requests.RequestException as exc:
        kind = type(exc).__name__
        where = f" {redacted(result_url)}" if result_url else ""
        if isinstance(exc, BAD_URL):
            error: UpstreamError = (ResultRefused if result_url else RequestRejected)(
                f"{action}{where}: invalid URL ({kind})")
        elif never_sent(exc):
            error = UpstreamUnavailable(f"{action}{where}: not sent ({kind})")
            error.never_sent = True
        elif posting:
            error = SubmitOutcomeUnknown(f"{action}: the request was sent, the answer lost "
                                         f"({kind}); not re-sent, to avoid paying twice")
        else:
            error = UpstreamUnavailable(f"{action}{where} failed: {kind}")
        raise error from None


def raise_for_submit(response: requests.Response) -> None:
    """A POST's status: retry only where the upstream surely created nothing."""
    status = response.status_code
    if 200 <= status < 300:
        return
    if status in SUBMIT_RETRY_STATUSES or (400 <= status < 500) or (
            status == 503 and _proxy_page(response)):
        raise_for_response(response)
    message = f"HTTP {status}: {error_message(response)}"
    raise SubmitOutcomeUnknown(f"submit answered {message}; the upstream may have created "
                               "the generation, so it is not re-sent", status=status)


def _proxy_page(response: requests.Response) -> bool:
    """Whether a 503 is a page that a proxy or load balancer wrote (HTML), the
    one 503 a POST is sent again after. Any other is the API's own, or may
    be: its JSON cut short, empty or not an object, or plain text (Envoy's
    "reset before headers" comes after it forwarded the POST; review 132)."""
    kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if kind:
        return kind == "text/html"
    try:
        return response.content.lstrip()[:1] == b"<"
    except BODY_READ_ERRORS:
        return False  # a body cut short proves nothing: outcome unknown


def raise_for_response(response: requests.Response, *, result_url: bool = False) -> None:
    """Translate a non-2xx answer into the error hierarchy; 2xx passes."""
    status = response.status_code
    if 200 <= status < 300:
        return
    message = f"HTTP {status}: {error_message(response)}"
    response.close()
    if result_url and status in (403, 404, 410):
        raise ResultLinkExpired(message, status=status)
    if status == 429:
        raise RateLimited(message, retry_after=retry_after_s(response))
    if 400 <= status < 500 and status != 408:
        raise RequestRejected(message, status=status)
    raise UpstreamUnavailable(message, status=status)
