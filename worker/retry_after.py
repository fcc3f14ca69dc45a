"""How long a 429 asks to wait: its `Retry-After`, in seconds or as an
HTTP-date. A date is read against the server's own clock (its `Date`
header), never the worker's, which may be minutes off; the asctime form,
which names no zone, is GMT like the other two.
"""
from __future__ import annotations

import datetime
import email.utils
import time

import requests


def retry_after_s(response: requests.Response) -> float | None:
    raw = response.headers.get("Retry-After")
    if not raw:
        return None
    try:
        value = float(raw)
        return max(0.0, value) if value == value and value != float("inf") else None
    except ValueError:
        pass
    when = _http_date(raw)
    if when is None:
        return None
    # Against the server's own clock (its Date header) when it sent one: the
    # worker's clock may be off by minutes, and the wait is the server's.
    sent = _http_date(response.headers.get("Date", ""))
    return max(0.0, when - (sent if sent is not None else time.time()))


def _http_date(raw: str) -> float | None:
    """An HTTP-date as a Unix time; the asctime form, which carries no zone,
    is GMT like the other two (never the worker's local time)."""
    try:
        when = email.utils.parsedate_to_datetime(raw)
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        return when.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        # OverflowError: a field out of range ("00:99999999999:00"). A 429
        # must stay a 429 whatever its header says (the default pause).
        return None
