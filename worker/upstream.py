"""The upstream API client: submit, fetch status, open a result for streaming.

All HTTP outcomes become `worker.errors` exceptions in `raise_for_response` and
`_send`, and nowhere else. The API key travels only in the Authorization
header; no message built here contains it.
"""
from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass

import requests

from .contract import ENDPOINTS, FAILURE_STATUSES, SUCCESS_STATUSES
from .errors import (
    BadResponse,
    ConfigError,
    GenerationFailed,
    RateLimited,
    RequestRejected,
    ResultLinkExpired,
    SubmitOutcomeUnknown,
    UpstreamUnavailable,
)
from .settings import Settings

REJECTED_STATUSES = frozenset({400, 401, 403, 404, 405, 409, 413, 422})
MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True)
class Generation:
    """One generation as the upstream describes it."""

    id: str
    status: str
    video_url: str | None = None
    error_message: str | None = None
    credits_used: float | None = None

    @property
    def succeeded(self) -> bool:
        return self.status in SUCCESS_STATUSES and bool(self.video_url)

    @property
    def failed(self) -> bool:
        return self.status in FAILURE_STATUSES

    @property
    def pending(self) -> bool:
        # Unknown statuses, and a success without a URL, are never success.
        return not (self.succeeded or self.failed)

    def raise_if_failed(self) -> None:
        if self.failed:
            raise GenerationFailed(self.error_message or f"generation {self.status}")


class UpstreamClient:
    """Talks to one endpoint pair of the upstream with one key."""

    def __init__(self, settings: Settings, session: requests.Session | None = None):
        if not settings.api_key:
            raise ConfigError("no API key: set AIMLAPI_KEY (or AIML_API_KEY)")
        self._endpoint = ENDPOINTS[settings.endpoint]
        self._base = settings.base_url.rstrip("/")
        self._timeout = settings.http_timeout_s
        self._session = session or requests.Session()
        self._auth = {"Authorization": f"Bearer {settings.api_key}"}

    def submit(self, request: dict) -> Generation:
        body = dict(request)
        if "enhance_prompt" in body:
            body[self._endpoint.expansion_flag] = body.pop("enhance_prompt")
        url = self._base + self._endpoint.submit_path
        # Once the request may have reached the upstream, sending it again could
        # pay twice (no idempotency key exists): those outcomes are not retried.
        try:
            return parse_generation(self._send("POST", url, json=body, headers=self._auth))
        except BadResponse as exc:
            raise SubmitOutcomeUnknown(f"submit answered without a readable id ({exc}); "
                                       "not re-sent, to avoid paying twice") from None
        except requests.ReadTimeout:
            raise SubmitOutcomeUnknown("submit timed out waiting for the answer; not "
                                       "re-sent, to avoid paying twice") from None

    def fetch(self, generation_id: str) -> Generation:
        url = self._base + self._endpoint.fetch_path
        params = {"generation_id": generation_id}
        return parse_generation(self._send("GET", url, params=params, headers=self._auth))

    def open_video(self, url: str) -> requests.Response:
        """A streaming response for a result URL; the caller must close it."""
        return self._send("GET", url, stream=True, result_url=True)

    def _send(self, method: str, url: str, *, result_url: bool = False, **kwargs):
        try:
            response = self._session.request(method, url, timeout=self._timeout, **kwargs)
        except requests.ReadTimeout:
            if method == "POST":
                raise  # the caller decides: the request may have been received
            raise UpstreamUnavailable(f"{method} timed out: ReadTimeout") from None
        except requests.Timeout as exc:
            raise UpstreamUnavailable(f"{method} timed out: {type(exc).__name__}") from None
        except requests.RequestException as exc:
            raise UpstreamUnavailable(f"{method} failed: {type(exc).__name__}") from None
        raise_for_response(response, result_url=result_url)
        return response


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
    if status in REJECTED_STATUSES:
        raise RequestRejected(message, status=status)
    raise UpstreamUnavailable(message, status=status)


def parse_generation(response: requests.Response) -> Generation:
    try:
        body = response.json()
    except ValueError:
        raise BadResponse(f"HTTP {response.status_code}: body is not JSON") from None
    if not isinstance(body, dict) or not body.get("id") or not body.get("status"):
        raise BadResponse(f"HTTP {response.status_code}: no id/status in {str(body)[:200]}")
    return Generation(
        id=str(body["id"]),
        status=str(body["status"]).lower(),
        video_url=_dig(body, "video", "url"),
        error_message=_body_message(body),
        credits_used=_dig(body, "meta", "usage", "credits_used"),
    )


def error_message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        text = " ".join(response.text.split())
        return (text or response.reason or "no body")[:MAX_MESSAGE_CHARS]
    found = _body_message(body) if isinstance(body, dict) else None
    return (found or str(body))[:MAX_MESSAGE_CHARS]


def retry_after_s(response: requests.Response) -> float | None:
    raw = response.headers.get("Retry-After")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _body_message(body: dict) -> str | None:
    error = body.get("error")
    if isinstance(error, dict) and error.get("message"):
        name = error.get("name")
        return f"{name}: {error['message']}" if name else str(error["message"])
    if isinstance(error, str) and error:
        return error
    if body.get("message"):
        return str(body["message"])
    detail = body.get("detail")
    if isinstance(detail, list) and detail:
        return "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
    if detail:
        return str(detail)
    return None


def _dig(body: dict, *path: str):
    for key in path:
        if not isinstance(body, dict):
            return None
        body = body.get(key)
    return body
