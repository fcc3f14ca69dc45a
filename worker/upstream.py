"""The upstream API client: submit, fetch status, open a result for streaming.

Every failure of an upstream call becomes a `worker.errors` exception in
`worker.upstream_errors` and nowhere else; a 2xx body is read by
`generation`. The API key travels only in the Authorization header of API
calls; no message built here contains it, nor a result URL's query, and an
upstream (or a gateway before it) that echoes the key in an error body has
it replaced by "[redacted]" before the text goes anywhere.

A 2xx answer cut short (the connection lost mid-body, a gateway's cut) still
names its generation when the id's pair came whole (`submitted_generation`).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from urllib.parse import urljoin

import requests
import urllib3.exceptions

from .contract import ENDPOINTS
from .errors import (
    BadResponse,
    ConfigError,
    SubmitOutcomeUnknown,
    UpstreamUnavailable,
)
from .generation import Generation, parse_body, parse_generation, salvaged_id
from .metrics_record import upstream_call
from .netguard import UrlPolicy, check_size, check_url, redacted
from .settings import Settings
from .upstream_errors import http_errors, raise_for_response, raise_for_submit
from .upstream_text import CALLER_KEY

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
ANSWER_PIECE = 4096  # bytes read at a time of a POST's answer
# A result body slower than this over a third of VIDQ_DOWNLOAD_GRACE_S is a
# stall, not a slow link: a 200 MB video at this rate would outlive the hard limit.
MIN_RESULT_BPS = 1000
# An attempt may take 3 download graces, or its length at this rate if longer.
MIN_AVERAGE_BPS = 10_000
class UpstreamClient:
    """Talks to one endpoint pair of the upstream with one key."""

    def __init__(self, settings: Settings, session: requests.Session | None = None):
        if not settings.api_key:
            raise ConfigError("no API key: set AIMLAPI_KEY (or AIML_API_KEY)")
        self._endpoint = ENDPOINTS[settings.endpoint]
        self._base = settings.base_url.rstrip("/")
        self._timeout = settings.http_timeout_s
        self._session = session or requests.Session()
        self._key = settings.api_key
        self._auth = {"Authorization": f"Bearer {settings.api_key}"}
        self._policy = UrlPolicy.build(settings.base_url, settings.result_url_allowlist,
                                       settings.max_video_bytes)

    def submit(self, request: dict) -> Generation:
        body = dict(request)
        if "enhance_prompt" in body:
            body[self._endpoint.expansion_flag] = body.pop("enhance_prompt")
        url = self._base + self._endpoint.submit_path
        # A fresh connection per POST: a pooled keep-alive connection the
        # server has just closed would turn a harmless resend into "unknown".
        with requests.Session() as fresh, upstream_call("submit"), self._key_kept_out(), \
                http_errors("submit", posting=True):
            # No redirect followed: a 307/308 would send the POST again, and a
            # 3xx is "outcome unknown" as the table above says (review 130).
            response = fresh.post(url, json=body, headers=self._auth, timeout=self._timeout,
                                  stream=True, allow_redirects=False)
            raise_for_submit(response)
            return submitted_generation(response)

    def fetch(self, generation_id: str) -> Generation:
        url = self._base + self._endpoint.fetch_path
        params = {"generation_id": generation_id}
        with upstream_call("status"), self._key_kept_out(), http_errors("status"):
            # Streamed: the status decides first, so a 429 whose body broke
            # off still pauses polls; a cut 2xx body is a failed poll.
            response = self._session.get(url, params=params, headers=self._auth,
                                         timeout=self._timeout, stream=True)
            raise_for_response(response)
            return parse_generation(response)

    @contextlib.contextmanager
    def _key_kept_out(self) -> Iterator[None]:
        """Error text comes from the upstream's body, which may echo the key
        ("Incorrect API key provided: sk-..."): every piece of it is read
        through `upstream_text`, which takes this key out before it goes on."""
        caller = CALLER_KEY.set(self._key)
        try:
            yield
        finally:
            CALLER_KEY.reset(caller)

    def open_video(self, url: str) -> requests.Response:
        """A streaming response for a result URL (every redirect checked by
        the SSRF guard); the caller must close it and read it via `chunks`."""
        for _ in range(MAX_REDIRECTS + 1):
            check_url(url, self._policy)
            with http_errors("download", result_url=url):
                # A video does not compress; a gzipped body would also make
                # its Content-Length the wire's, not the file's.
                response = self._session.get(url, stream=True, timeout=self._timeout,
                                             allow_redirects=False,
                                             headers={"Accept-Encoding": "identity"})
            if not response.is_redirect:
                raise_for_response(response, result_url=True)
                announced = response.headers.get("Content-Length", "")
                if announced.isdigit():
                    check_size(int(announced), self._policy)
                return response
            location = response.headers.get("Location", "")
            response.close()
            url = urljoin(url, location)
        # A CDN's fault that often passes, not a URL vidq refuses: a paid
        # video is tried again (each hop was checked by the SSRF guard).
        raise UpstreamUnavailable(f"more than {MAX_REDIRECTS} redirects from a result URL")

    def chunks(self, response: requests.Response, size: int,
               stall_window_s: float) -> Iterator[bytes]:
        """The body of an open result as it arrives, size-capped, failures
        mapped. Under MIN_RESULT_BPS over `stall_window_s` the attempt is
        given up (UpstreamUnavailable: tried again later): a result URL that
        trickles a byte at a time, never long enough quiet for the read
        timeout, held a worker process with no bound."""
        started = window_start = time.monotonic()
        total = window_bytes = 0
        announced = file_length(response) or ""
        expected = int(announced) if announced.isdigit() else self._policy.max_bytes
        attempt_s = max(9 * stall_window_s, expected / MIN_AVERAGE_BPS)
        with http_errors("download", result_url=response.url):
            # read1, not iter_content: what has arrived, not a full chunk's
            # wait, so a trickle is seen as one.
            while chunk := response.raw.read1(size, decode_content=True):
                total += len(chunk)
                check_size(total, self._policy)
                window_bytes += len(chunk)
                now = time.monotonic()
                if now - window_start >= stall_window_s:
                    if window_bytes < MIN_RESULT_BPS * (now - window_start):
                        raise UpstreamUnavailable(
                            f"download {redacted(response.url)}: {window_bytes} bytes in the "
                            f"last {now - window_start:.0f} s, under {MIN_RESULT_BPS} bytes/s")
                    window_start, window_bytes = now, 0
                if now - started > attempt_s:  # just above the floor, for hours
                    raise UpstreamUnavailable(
                        f"download {redacted(response.url)}: {total} bytes in "
                        f"{now - started:.0f} s, under {MIN_AVERAGE_BPS} bytes/s on average")
                yield chunk


def file_length(response: requests.Response) -> str | None:
    """The video's length as announced: the Content-Length, unless a
    Content-Encoding (asked for or not) makes that the wire's length."""
    if response.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
        return None
    return response.headers.get("Content-Length")


def submitted_generation(response: requests.Response) -> Generation:
    """The generation a 2xx answer to a POST names. Its body is read piece by
    piece: an answer cut short (the connection closed mid-body, or a gateway's
    Content-Length cut it) still gives its id if the id's pair came whole. The
    upstream created that generation; without its id it is paid and lost."""
    received, problem = bytearray(), ""
    try:
        while piece := response.raw.read1(ANSWER_PIECE, decode_content=True):
            received += piece
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        problem = f"its body broke off or could not be decoded ({type(exc).__name__})"
    try:
        if not problem:
            return parse_body(response.status_code, bytes(received), response.encoding,
                              submitted=True)
    except BadResponse as exc:
        problem = str(exc)
    generation_id = salvaged_id(bytes(received))
    if generation_id is None:
        raise SubmitOutcomeUnknown(f"submit answered without a readable id ({problem}); "
                                   "not re-sent, to avoid paying twice")
    log.warning("submit: %s, but it named generation %s first: recorded", problem,
                generation_id)
    return Generation(id=generation_id, status="queued")
