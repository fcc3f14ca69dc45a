"""Redis clients for vidq's records: a plain URL, or Redis Sentinel.

A sentinel URL (`sentinel://h1:26379;sentinel://h2:26379?master_name=m`, as
`Settings` builds it from VIDQ_REDIS_SENTINEL_MASTER) gives a client of the
current master that follows a failover.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from .errors import ConfigError
from .netguard import without_credentials
from .redis_url import is_sentinel_url, sentinel_master_of


class FollowMaster(SentinelManagedConnection):
    """redis-py 8.1 reconnects a command's retries with `connect_check_health`
    at the address it had, bypassing the sentinel lookup of `connect`: every
    retry after a failover went to the dead master. Ask the sentinels first."""

    def connect_check_health(self, check_health: bool = True,
                             retry_socket_connect: bool = True):
        if not self._sock and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        return super().connect_check_health(check_health=check_health,
                                            retry_socket_connect=retry_socket_connect)


def connect(redis_url: str) -> redis.Redis:
    """A client for vidq's records; a malformed URL is a ConfigError.

    A sentinel URL (`sentinel://h1:26379;sentinel://h2:26379?master_name=m`, as
    Settings builds it from VIDQ_REDIS_SENTINEL_MASTER) gives a client of the
    current master: after a failover its connections fail once, then it asks the
    sentinels again. Commands are retried on connection errors for up to ~30 s,
    longer than a failover takes; scripts reload themselves (NOSCRIPT) on the
    new master. The password (and db) are those of the first part with one."""
    options = dict(decode_responses=True, health_check_interval=10, socket_connect_timeout=5,
                   socket_timeout=30, retry_on_timeout=True)
    try:
        if not is_sentinel_url(redis_url):
            named_db = urlsplit(redis_url).path.strip("/")
            if named_db and not named_db.isdigit():  # redis-py would quietly use db 0
                raise ValueError(f"db {named_db!r} is not a number")
            return redis.Redis.from_url(redis_url, **options)
        master = sentinel_master_of(redis_url)
        if not master:
            raise ConfigError("VIDQ_REDIS_URL is a sentinel URL: set VIDQ_REDIS_SENTINEL_MASTER")
        nodes, auth, db = [], {}, 0
        for part in (p.strip() for p in redis_url.split(";") if p.strip()):
            url = urlsplit(part)
            nodes.append((url.hostname or "127.0.0.1", url.port or 26379))
            if url.password and "password" not in auth:
                auth = {"username": unquote(url.username) if url.username else None,
                        "password": unquote(url.password)}
            if url.path.strip("/") and not db:
                db = int(url.path.strip("/"))
    except ValueError:
        # The parser's own text may quote a piece of the password (a '/' in it
        # splits the URL there), so it is not shown.
        raise ConfigError(f"VIDQ_REDIS_URL is not a Redis URL: {without_credentials(redis_url)} "
                          "(redis://[:password@]host:port/db; percent-encode '/', '#', '?' "
                          "and '@' in a password)") from None
    # The sentinels answer fast or not at all: a dead one is skipped quickly.
    sentinels = Sentinel(nodes, sentinel_kwargs={"socket_connect_timeout": 1, "socket_timeout": 2})
    retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=20)
    # Typed as Any: redis-py's stubs type master_for's keywords by position.
    connection: dict[str, Any] = {**auth, **options}
    return sentinels.master_for(master, db=db, retry=retry, connection_class=FollowMaster,
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError],
                                **connection)


def op_id() -> str:
    """An id for one script call. redis-py sends a call again when its reply
    is lost (a dropped connection, a Redis restart); the script then knows it
    ran already and answers as it did, instead of "the token moved on", which
    would stop a job's chain until the reconciler re-sends it."""
    return os.urandom(8).hex()


def take_lock(client: redis.Redis, key: str, token: str, ttl_s: float) -> bool:
    """SET key token NX with a TTL; True if this caller holds the lock. A SET
    whose reply was lost is sent again by the client and finds the key taken:
    taken by this very token, the lock is ours (not a ten-minute wait)."""
    if client.set(key, token, nx=True, px=max(1, int(ttl_s * 1000))):
        return True
    return client.get(key) == token


def run_pipeline(client: redis.Redis, build: Callable[[Any], None],
                 raise_on_error: bool = True) -> list:
    """Run the pipeline that `build(pipe)` fills. A pipeline loads its scripts
    once, before redis-py's retries: re-sent to a Redis that restarted (or a
    promoted replica), whose script cache is empty, it fails with NOSCRIPT.
    Built again, it loads them; its calls carry their ids, so one that had
    run answers as it did. With `raise_on_error` False, a command's error is
    its answer (the commands before and after it still ran)."""
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        build(pipe)
        try:
            answers = pipe.execute(raise_on_error=raise_on_error)
        except redis.exceptions.NoScriptError:
            if attempt == 2:
                raise
            continue
        if attempt == 1 and any(isinstance(a, redis.exceptions.NoScriptError) for a in answers):
            continue
        return answers
    return []
