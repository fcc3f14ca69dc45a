"""Webhooks: the event stream's events POSTed, signed, to the deployment's
URL (VIDQ_WEBHOOK_URL, every batch) and to a batch's own (`vidq enqueue
--webhook URL`, stored on the batch).

    relay (reconciler pass) ── XREADGROUP vidq:events, group "vidq-webhooks" ──►
        one delivery record per (event, target), a vidq.webhook task each, XACK
    vidq.webhook task ── SSRF check, sign, POST ──► 2xx: delivered
        5xx, 408, 429, timeout, connection error: again after a countdown
        (exponential, up to a day); any other answer: failed (`--replay` sends again)

At least once: a relay that dies before its XACK hands the same entries out
again (its pending entries are read first), and a record that exists is not
made twice. A pending delivery is due (vidq:webhooks_due) by the time its
attempt or countdown must have ended; past it, its message was lost (a worker
killed mid-attempt: the redelivered message finds the attempt taken) and the
relay sends it again. A receiver de-duplicates on `webhook-id`, the event id,
the same on every attempt and replay. The secret is the workers' (VIDQ_WEBHOOK_SECRET),
for the batch URLs too: Redis holds URLs, never a secret.
"""
from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
import requests

from . import events, keys
from .connection import op_id, take_lock
from .errors import ResultRefused, UpstreamUnavailable
from .jobs import load_script
from .netguard import UrlPolicy, check_url, redacted
from .webhook_signing import headers, secret_key

log = logging.getLogger(__name__)

GROUP, CONSUMER = "vidq-webhooks", "relay"
READ_COUNT = 500
# Delivery records outlive the longest retry window, then expire.
RECORD_TTL_S = 8 * 86400
# Longest countdown between attempts: well under any visibility timeout.
MAX_BACKOFF_S = 600.0
RETRYABLE_STATUS = frozenset({408, 429})
# A relay pass that dies leaves the lock to expire after this.
RELAY_LOCK_S = 60
# An attempt takes about two timeouts at most (connect, then the answer): a
# pending delivery not settled this long after it was due lost its message.
LEASE_MARGIN_S = 5.0
# A replayed delivery's message is sent at once by `vidq webhooks --replay`.
REPLAY_DUE_S = 60.0

Send = Callable[[str, int, float], None]  # delivery id, attempt, countdown


class State:
    PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


@dataclass(frozen=True)
class Outcome:
    """What one attempt did: delivered, retry after `retry_in_s`, or failed."""

    state: str
    status: int | None
    error: str = ""
    retry_in_s: float | None = None


def relay(client: redis.Redis, settings, send: Send) -> int:
    """Turn the stream's new events into deliveries; returns how many were made.
    One relay at a time (a lock), so its own pending entries are its to redo."""
    token = uuid.uuid4().hex
    if not take_lock(client, keys.WEBHOOK_RELAY_LOCK, token, RELAY_LOCK_S):
        return 0
    try:
        events.ensure_group(client, GROUP)
        made = 0
        # Pending first (a relay that died before its XACK); an acked entry
        # leaves the pending list, so "0" is read again until it is empty.
        for cursor in ("0", ">"):
            while entries := _read(client, cursor):
                made += sum(_relay_one(client, settings, send, i, f) for i, f in entries)
                client.xack(keys.EVENTS, GROUP, *[event_id for event_id, _ in entries])
        resend_lost(client, settings, send)
        events.trim(client, settings.events_maxlen)
        return made
    finally:
        if client.get(keys.WEBHOOK_RELAY_LOCK) == token:
            client.delete(keys.WEBHOOK_RELAY_LOCK)


def _read(client: redis.Redis, cursor: str) -> list:
    answer: Any = client.xreadgroup(GROUP, CONSUMER, {keys.EVENTS: cursor}, count=READ_COUNT)
    return answer[0][1] if answer else []


def _relay_one(client: redis.Redis, settings, send: Send, event_id: str, fields: dict) -> int:
    batch = fields.get("batch", "")
    targets = [("deployment", settings.webhook_url),
               ("batch", client.hget(keys.batch(batch), "webhook_url") or "")]
    made = 0
    for target, url in targets:
        if not url:
            continue
        ident = delivery_id(target, event_id)
        if create(client, event_id, fields, target, url, lease_s(settings)):
            made += 1
        elif not _never_tried(client, ident):
            continue
        # A relay that died between the record and its task left it untried:
        # sent again (a duplicate message finds its attempt taken: see claim).
        send(ident, 0, 0.0)
    return made


def _never_tried(client: redis.Redis, ident: str) -> bool:
    state, attempts = client.hmget(keys.webhook_delivery(ident), "state", "attempts")
    return state == State.PENDING and str(attempts) == "0"


def delivery_id(target: str, event_id: str) -> str:
    return f"{target}:{event_id}"


def create(client: redis.Redis, event_id: str, fields: dict, target: str, url: str,
           due_in_s: float = REPLAY_DUE_S) -> bool:
    """A delivery record, unless it exists (the relay redoing an entry); all
    of it or nothing (a relay dying half-way must not leave a record unsent)."""
    ident = delivery_id(target, event_id)
    key, batch = keys.webhook_delivery(ident), fields.get("batch", "")
    now = _now(client)
    record: dict[Any, Any] = {"id": ident, "event_id": event_id, "type": fields.get("type", ""),
              "batch": batch, "target": target, "url": url, "state": State.PENDING,
              "attempts": 0, "created_at": repr(now), "first_at": repr(now),
              "body": events.body(event_id, fields).decode()}
    with client.pipeline() as pipe:
        try:
            pipe.watch(key)
            if pipe.exists(key):
                return False
            pipe.multi()
            pipe.hset(key, mapping=record)
            pipe.expire(key, RECORD_TTL_S)
            pipe.zadd(keys.batch_webhooks(batch), {ident: now})
            pipe.expire(keys.batch_webhooks(batch), RECORD_TTL_S)
            pipe.zadd(keys.WEBHOOKS_DUE, {ident: now + due_in_s})
            pipe.execute()
        except redis.WatchError:
            return False
    return True


def lease_s(settings) -> float:
    return 2 * settings.webhook_timeout_s + LEASE_MARGIN_S


def resend_lost(client: redis.Redis, settings, send: Send) -> int:
    """Send again the pending deliveries past due: their message was lost.
    The attempt is the one the record expects; a duplicate finds it taken.
    Resent less and less often (no worker may consume vidq.webhook at all)."""
    now = _now(client)
    lost = [str(i) for i in client.zrangebyscore(keys.WEBHOOKS_DUE, "-inf", now, start=0,
                                                 num=READ_COUNT)]
    for ident in lost:
        state, attempts = client.hmget(keys.webhook_delivery(ident), "state", "attempts")
        if state != State.PENDING:
            client.zrem(keys.WEBHOOKS_DUE, ident)
            continue
        resends = client.hincrby(keys.webhook_delivery(ident), "resends", 1)
        wait = lease_s(settings) * 2 ** min(resends - 1, 6)
        client.zadd(keys.WEBHOOKS_DUE, {ident: now + wait}, gt=True)
        log.warning("webhook %s: its attempt was lost; sent again", ident)
        send(ident, int(attempts or 0), 0.0)
    return len(lost)


def claim(client: redis.Redis, ident: str, attempt: int,
          lease: float = REPLAY_DUE_S) -> dict | None:
    """The record if it is pending at `attempt` (then counted as attempt + 1,
    due by the end of the lease); None for a duplicated or outdated message."""
    flat = load_script(client, "webhook_claim")(
        keys=[keys.webhook_delivery(ident), keys.WEBHOOKS_DUE],
        args=[attempt, repr(lease), op_id(), ident])
    return dict(zip(flat[::2], flat[1::2], strict=True)) if flat else None


def deliver(client: redis.Redis, settings, session: requests.Session, ident: str,
            attempt: int, send: Send) -> Outcome | None:
    """One attempt of one delivery; schedules the next if it may be retried."""
    record = claim(client, ident, attempt, lease_s(settings))
    if record is None:
        return None
    outcome = attempt_post(settings, session, record)
    if outcome.retry_in_s is not None:
        delay = backoff_s(settings, attempt + 1)
        if _now(client) + delay - float(record["first_at"]) > settings.webhook_retry_for_s:
            outcome = Outcome(State.FAILED, outcome.status,
                              f"gave up after {attempt + 1} attempts: {outcome.error}")
        else:
            outcome = Outcome(State.PENDING, outcome.status, outcome.error, delay)
    _record(client, ident, outcome, lease_s(settings))
    if outcome.retry_in_s is not None:
        send(ident, attempt + 1, outcome.retry_in_s)
    log.log(logging.INFO if outcome.state != State.FAILED else logging.WARNING,
            "webhook %s to %s: %s%s", ident, redacted(record["url"]), outcome.state,
            f" ({outcome.error})" if outcome.error else "")
    return outcome


def attempt_post(settings, session: requests.Session, record: dict) -> Outcome:
    """POST once: the answer decides delivered, retry or failed."""
    if not settings.webhook_secret:
        return Outcome(State.FAILED, None, "no VIDQ_WEBHOOK_SECRET on the workers: not sent")
    url = record["url"]
    try:
        check_url(url, UrlPolicy.build("", settings.webhook_allowlist))
    except ResultRefused as exc:
        return Outcome(State.FAILED, None, str(exc).replace("result URL", "webhook URL"))
    except UpstreamUnavailable as exc:
        return Outcome(State.PENDING, None, str(exc), 0.0)
    body = record["body"].encode()
    sent = headers(secret_key(settings.webhook_secret), record["event_id"], int(time.time()),
                   body)
    try:
        answer = session.post(url, data=body, headers=sent, timeout=settings.webhook_timeout_s,
                              allow_redirects=False)
    except requests.RequestException as exc:
        return Outcome(State.PENDING, None, f"{type(exc).__name__}", 0.0)
    if 200 <= answer.status_code < 300:
        return Outcome(State.DELIVERED, answer.status_code)
    error = f"HTTP {answer.status_code}"
    if answer.status_code >= 500 or answer.status_code in RETRYABLE_STATUS:
        return Outcome(State.PENDING, answer.status_code, error, 0.0)
    return Outcome(State.FAILED, answer.status_code, error)


def backoff_s(settings, attempt: int) -> float:
    """Exponential from the base, capped, with jitter so a recovering receiver
    is not hit by every retry at once."""
    delay = min(settings.webhook_backoff_base_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
    return delay * random.uniform(0.8, 1.0)


def _record(client: redis.Redis, ident: str, outcome: Outcome, lease: float) -> None:
    now = _now(client)
    values: dict[Any, Any] = {
        "state": outcome.state, "last_at": repr(now), "last_error": outcome.error,
        "last_status": "" if outcome.status is None else str(outcome.status),
        "next_at": repr(now + outcome.retry_in_s) if outcome.retry_in_s else ""}
    if outcome.state == State.DELIVERED:
        values["delivered_at"] = repr(now)
    pipe = client.pipeline()
    pipe.hset(keys.webhook_delivery(ident), mapping=values)
    if outcome.retry_in_s:
        pipe.zadd(keys.WEBHOOKS_DUE, {ident: now + outcome.retry_in_s + lease})
    else:
        pipe.zrem(keys.WEBHOOKS_DUE, ident)
    pipe.execute()


def deliveries(client: redis.Redis, batch: str) -> list[dict]:
    """A batch's delivery records, oldest first."""
    idents = client.zrange(keys.batch_webhooks(batch), 0, -1)
    pipe = client.pipeline(transaction=False)
    for ident in idents:
        pipe.hgetall(keys.webhook_delivery(str(ident)))
    return [record for record in pipe.execute() if record]


def reopen(client: redis.Redis, ident: str) -> bool:
    """A failed delivery made pending again, its day of retries restarted."""
    key = keys.webhook_delivery(ident)
    if client.hget(key, "state") != State.FAILED:
        return False
    now = _now(client)
    client.hset(key, mapping={"state": State.PENDING, "attempts": 0,
                              "first_at": repr(now), "next_at": ""})
    client.hincrby(key, "replays", 1)
    client.zadd(keys.WEBHOOKS_DUE, {ident: now + REPLAY_DUE_S})
    return True


def _now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6
