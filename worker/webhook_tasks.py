"""The vidq.webhook task, on its own queue: one delivery attempt
(worker.webhooks decides everything; this only wires it to Celery)."""
from __future__ import annotations

import os

import requests

from . import webhooks
from .celery_app import app, settings_of
from .tasks import get_steps

TASK = "vidq.webhook"
_sessions: dict[int, requests.Session] = {}


def send_delivery(ident: str, attempt: int, countdown: float) -> None:
    """Publish one attempt; the message carries ids only, never a URL or secret."""
    app.tasks[TASK].apply_async((ident, attempt), countdown=countdown if countdown > 0 else None)


def _session() -> requests.Session:
    # An HTTP session does not survive fork: one per pool process.
    session = _sessions.get(os.getpid())
    if session is None:
        _sessions.clear()
        session = _sessions[os.getpid()] = requests.Session()
    return session


@app.task(name=TASK)
def deliver(ident: str, attempt: int) -> str:
    """POST one webhook delivery, signed; retried by a new countdown message."""
    outcome = webhooks.deliver(get_steps().store.redis, settings_of(app), _session(), ident,
                               attempt, send_delivery)
    if outcome is None:
        return f"webhook {ident}: stale message, nothing to do"
    return f"webhook {ident}: {outcome.state}" + (f" ({outcome.error})" if outcome.error else "")
