"""What the upstream's answers say: one generation, read from a JSON body.

Only the fields named in the contract are read; anything else in the body is
ignored, and a body without an id (or, but for a submit's, a status) is a
`BadResponse`. Unknown
statuses, and a success without a video URL, are pending, never success: the
job is polled again rather than marked done with nothing to download.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import requests

from .contract import FAILURE_STATUSES, PENDING_STATUSES, SUCCESS_STATUSES
from .errors import BadResponse, GenerationFailed
from .upstream_text import body_message, cut

log = logging.getLogger(__name__)


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


def parse_generation(response: requests.Response, *, submitted: bool = False) -> Generation:
    """The generation an answer describes. A submit's answer needs only its
    id (the reference client reads nothing else; the status is then
    `queued`): thrown away for want of a status, a paid id ended "outcome
    unknown", never polled (review 126)."""
    try:
        body = response.json()
    except (ValueError, RecursionError):
        raise BadResponse(f"HTTP {response.status_code}: body is not JSON") from None
    return _generation(response.status_code, body, submitted)


def parse_body(status: int, raw: bytes, charset: str | None, *,
               submitted: bool = False) -> Generation:
    """`parse_generation` for a body already read, decoded as requests'
    `json()` would: UTF-8/16/32, else the answer's charset (ISO-8859-1 for a
    text/* answer without one), a stray byte replaced (review 130: a prompt
    echoed in Latin-1 before the id lost a paid id)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        try:
            body = json.loads(raw.decode(charset or "utf-8", errors="replace"))
        except (ValueError, RecursionError, LookupError):  # LookupError: no such charset
            raise BadResponse(f"HTTP {status}: body is not JSON") from None
    return _generation(status, body, submitted)


def _generation(status: int, body, submitted: bool) -> Generation:
    if not isinstance(body, dict) or not _text(body.get("id")):
        raise BadResponse(f"HTTP {status}: no id in {cut(str(body), 200)}")
    if not _text(body.get("status")) and not submitted:
        raise BadResponse(f"HTTP {status}: no status in {cut(str(body), 200)}")
    video_url = _dig(body, "video", "url")
    return Generation(
        id=str(body["id"]),
        status=_status(body.get("status")),
        video_url=video_url if isinstance(video_url, str) else None,
        error_message=body_message(body),
        credits_used=_credits(_dig(body, "meta", "usage", "credits_used")),
    )


_UNKNOWN_SEEN: set[str] = set()
UNKNOWN_SAID = 100  # words the upstream chooses: a bounded set


def _status(value) -> str:
    status = str(value).lower() if _text(value) else "queued"
    if status not in PENDING_STATUSES | SUCCESS_STATUSES | FAILURE_STATUSES \
            and status not in _UNKNOWN_SEEN and len(_UNKNOWN_SEEN) < UNKNOWN_SAID:
        # Read as pending (CONTRACT.md), said once: a word that means
        # "finished" would hold slots to the hard limit, unseen (review 126).
        _UNKNOWN_SEEN.add(status)
        log.warning("the upstream answered an unknown status %r: read as pending",
                    cut(status, 60))
    return status



def _text(value) -> bool:
    return (isinstance(value, str) and value != "") or (
        isinstance(value, int) and not isinstance(value, bool))


def _credits(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):  # OverflowError: an integer of 400 digits
        return None
    return number if number == number and abs(number) != float("inf") else None


def _dig(body, *path: str):
    for key in path:
        if not isinstance(body, dict):
            return None
        body = body.get(key)
    return body


def salvaged_id(raw: bytes) -> str | None:
    """The id in an answer cut short, if its top-level "id" pair came whole:
    followed by the "," or "}" after it, so the cut cannot have shortened it
    (a number cut after its first digits still parses). Nested ids, and
    anything after the first pair the cut broke, are never read; a second
    whole "id" pair makes it None (a JSON parser keeps the last)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:  # a cut may split a character
        text = raw[:exc.start].decode("utf-8")
    ids = [value for key, value in _whole_pairs(text) if key == "id"]
    return str(ids[0]) if len(ids) == 1 and _text(ids[0]) else None


def _whole_pairs(text: str) -> Iterator[tuple[object, object]]:
    """The top-level (key, value) pairs of a JSON object's text, up to the
    first one not followed by "," or "}" (the cut may have shortened it)."""
    decoder, at = json.JSONDecoder(), _after_space(text, 0)
    if not text.startswith("{", at):
        return
    at += 1
    try:
        while True:
            key, at = decoder.raw_decode(text, _after_space(text, at))
            at = _after_space(text, at)
            if not text.startswith(":", at):
                return
            value, at = decoder.raw_decode(text, _after_space(text, at + 1))
            at = _after_space(text, at)
            if at >= len(text) or text[at] not in ",}":
                return
            yield key, value
            if text[at] == "}":
                return
            at += 1
    except (ValueError, RecursionError):
        return


def _after_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at
