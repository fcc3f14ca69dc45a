"""Text from the upstream's answers, for error messages and logs: the
upstream's own message if its body has one, cut to `MAX_MESSAGE_CHARS`.

An upstream (or a gateway before it) may quote the API key back ("Incorrect
API key provided: sk-..."). The key of the client whose call is being
answered (`CALLER_KEY`, set by `worker.upstream.UpstreamClient`) is replaced
by "[redacted]" before any cut, so no head of a cut key survives either.
"""
from __future__ import annotations

import functools
import re
from contextvars import ContextVar

import requests
import urllib3

MAX_MESSAGE_CHARS = 500
REDACTED = "[redacted]"
CALLER_KEY: ContextVar[str] = ContextVar("vidq_caller_key", default="")
MIN_KEY_HEAD = 8  # a head of the key this long, cut short by a gateway, goes too


# What reading an answer's body may raise once its status line has come: the
# connection lost mid-body, a body that cannot be decoded.
BODY_READ_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)


def error_message(response: requests.Response) -> str:
    """The upstream's reason for a non-2xx answer. Only for the message: its
    status line decides what happened, so a body cut short (the connection
    closed mid-body) names no reason but changes nothing (review 138: a 429
    with a cut body was taken for a POST's lost answer, "outcome unknown")."""
    try:
        body = response.json()
    except (ValueError, RecursionError):
        text = " ".join(scrub(response.text).split())
        return cut(text or response.reason or "no body")
    except BODY_READ_ERRORS as exc:
        return cut(f"{response.reason or 'no reason'} (its body unreadable: "
                   f"{type(exc).__name__})")
    found = body_message(body) if isinstance(body, dict) else None
    return cut(found or str(body))


def body_message(body: dict) -> str | None:
    error = body.get("error")
    if isinstance(error, dict) and error.get("message"):
        name = error.get("name")
        return cut(f"{name}: {error['message']}" if name else str(error["message"]))
    if isinstance(error, str) and error:
        return cut(error)
    if body.get("message"):
        return cut(str(body["message"]))
    detail = body.get("detail")
    if isinstance(detail, list) and detail:
        return cut("; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d)
                              for d in detail))
    if detail:
        return cut(str(detail))
    return None


def cut(text: str, length: int = MAX_MESSAGE_CHARS) -> str:
    """Upstream text for a message: the caller's key out first, then cut."""
    return scrub(text)[:length]


def scrub(text: str, key: str = "") -> str:
    """`text` without `key` (default: the caller's), even wrapped over lines
    (a real line break, or one written as \\n in a JSON or repr string), nor
    any head of it of MIN_KEY_HEAD characters or more (a gateway cut it)."""
    key = key or CALLER_KEY.get()
    return _key_pattern(key).sub(REDACTED, text) if key else text


@functools.lru_cache(maxsize=4)
def _key_pattern(key: str) -> re.Pattern[str]:
    gap = r"(?:\s|\\[nrt])*"
    chars = [re.escape(c) for c in key]
    tail = ""
    for char in reversed(chars[MIN_KEY_HEAD:]):  # each further character optional, in turn
        tail = f"(?:{gap}{char}{tail})?"
    return re.compile(gap.join(chars[:MIN_KEY_HEAD]) + tail)
