"""Keep a worker alive when Redis restarts (celery 5.7.0 + kombu 5.7.0).

The bug: a worker holding unacked messages (every countdown poll, under
acks_late) exits with `Unrecoverable error: AttributeError("'NoneType'
object has no attribute 'hostname'")` when the broker connection drops.
`Consumer.on_connection_error_after_connected` calls `connection.collect()`,
which detaches the transport (`transport.client = None`,
kombu/connection.py `_do_close_transport`) while the default channel stays
open; celery 5.7 then also calls `connection.close()`, whose
`Channel.close` -> `QoS.restore_unacked_once` -> `restore_unacked` ->
`_connparams` reads `self.connection.client.hostname` and raises
AttributeError, which nothing catches (kombu/transport/redis.py).

A Redis at maxmemory (noeviction) refusing an ack's write ended the worker
the same way (OutOfMemoryError): that ack is dropped too, with an error.

The same detached channel also breaks `QoS.ack` and `QoS.reject` of a task
that started before the connection dropped and ends after it (the pool
result handler calls them on the old channel): the AttributeError again ends
the worker.

The workaround: when the transport is already detached, or Redis is down,
`restore_unacked` keeps the messages instead of crashing, and a consumer step
puts them back once the worker has reconnected: from Redis's `unacked` hash
if Redis kept them (AOF), else from the copy in memory. An ack or reject on a
detached channel is dropped with a warning; the message stays in Redis's
`unacked` hash and comes back later, which is harmless: every step runs only
with its job's current token, so a message delivered twice does nothing.
"""
from __future__ import annotations

import logging

import redis
from celery import Celery, bootsteps
from celery.worker.consumer.tasks import Tasks
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

log = logging.getLogger(__name__)
_deferred: list[tuple[str, object, str | None, str | None]] = []
_original_restore_unacked = kombu_redis.QoS.restore_unacked
_original_ack = kombu_redis.QoS.ack
_original_reject = kombu_redis.QoS.reject


def _detached(qos) -> bool:
    return getattr(qos.channel.connection, "client", None) is None


def _defer_delivered(qos) -> None:
    for tag, message in list(qos._delivered.items()):
        info = message.delivery_info
        _deferred.append((tag, message._raw, info.get("exchange"), info.get("routing_key")))
    log.warning("broker lost: %d unacked message(s) will be restored on reconnect",
                len(qos._delivered))
    qos._delivered.clear()


def _restore_unacked(self, client=None):
    if client is None and _detached(self):
        return _defer_delivered(self)
    try:
        return _original_restore_unacked(self, client)
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return _defer_delivered(self)  # Redis is down: restore them once it is back


def _ack(self, delivery_tag):
    if _detached(self):
        log.warning("ack of %s dropped: its connection is gone (it will be redelivered "
                    "and find its step done)", delivery_tag)
        return virtual.QoS.ack(self, delivery_tag)
    try:
        return _original_ack(self, delivery_tag)
    except redis.exceptions.OutOfMemoryError:
        return _dropped_when_full(self, delivery_tag, "ack")


def _reject(self, delivery_tag, requeue=False):
    if _detached(self):
        log.warning("reject of %s dropped: its connection is gone", delivery_tag)
        return virtual.QoS.ack(self, delivery_tag)
    try:
        return _original_reject(self, delivery_tag, requeue)
    except redis.exceptions.OutOfMemoryError:
        return _dropped_when_full(self, delivery_tag, "reject")


def _dropped_when_full(qos, delivery_tag, what: str):
    # Redis at maxmemory (noeviction) refuses the ack's write; uncaught, it
    # ends the worker. The message stays in Redis's unacked hash and comes
    # back after the visibility timeout, finding its step done.
    log.error("%s of %s dropped: Redis is out of memory (maxmemory); it will be "
              "redelivered and find its step done", what, delivery_tag)
    return virtual.QoS.ack(qos, delivery_tag)


class RestoreDeferredUnacked(bootsteps.StartStopStep):
    """After (re)connecting, put the deferred messages back on their queues once."""

    requires = (Tasks,)

    def start(self, consumer):
        if not _deferred:
            return
        items, _deferred[:] = list(_deferred), []
        channel = consumer.connection.default_channel
        with channel.conn_or_acquire() as client:
            for tag, raw, exchange, routing_key in items:
                if client.hexists(channel.unacked_key, tag):
                    channel.qos.restore_by_tag(tag, client=client)  # atomic: no duplicate
                else:
                    with client.pipeline() as pipe:
                        channel._do_restore_message(raw, exchange, routing_key, pipe)
                        pipe.execute()
        log.warning("restored %d unacked message(s) after reconnecting", len(items))


def install(app: Celery) -> None:
    kombu_redis.QoS.restore_unacked = _restore_unacked  # type: ignore[method-assign]
    kombu_redis.QoS.ack = _ack  # type: ignore[method-assign]
    kombu_redis.QoS.reject = _reject  # type: ignore[method-assign]
    app.steps["consumer"].add(RestoreDeferredUnacked)
