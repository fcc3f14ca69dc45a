"""Make a write durable before acting on it: the "POST started" marker must
survive a Redis crash or failover, or a recovered submit could POST again;
so must a paid generation id, or its video is lost (the worker holds the id
and records it again until the wait succeeds, on a new master if need be).

What each Redis setting guarantees (the README's Reliability section):

    Redis >= 7.2 with AOF on        WAITAOF 1 0: the marker is fsynced locally first
    replicas connected              WAIT n: every replica has the marker first
    Redis < 7.2, appendfsync always every write is fsynced before the reply
    appendfsync everysec / no AOF   up to ~1 s (or everything) may be lost on a crash:
                                    a job POSTed in that window may be POSTed again
                                    (logged as a warning at start); a paid id is
                                    recorded again if Redis restarted within
                                    SETTLE_S of its record

A Redis that may evict any key when memory is full (maxmemory-policy
allkeys-*) could drop a job's record with its generation id: a worker
refuses to start on it, and refuses to POST if it changes to that later.

`vidq run`'s private Redis uses AOF with appendfsync always.

With Redis Sentinel the client is the current master's (`jobs.connect`), so
the probe and every WAIT run on the master. The replica count is read again
every REPROBE_S, and at once when a WAIT is answered by fewer replicas than
expected (a failover, or a replica lost): the marker is then accepted if every
replica the current master has acknowledged it, with that master's own AOF as
the remaining guarantee (logged), so a run goes on after losing its master.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import redis

from .errors import ConfigError

log = logging.getLogger(__name__)
WAIT_TIMEOUT_MS = 2000
REPROBE_S = 30.0
# appendfsync everysec writes to disk every second, late by up to 2 s when the
# disk is slow: a write acknowledged this long ago is on disk.
SETTLE_S = 3.0


class NotDurable(redis.RedisError):
    """The marker did not reach disk or the replicas in time: do not POST.
    (For a generation id: `answer` is what its recording answered. For a
    marker: `mine`, whether the marker cleared was the try's own, and
    `carried`, what the next try's record must name.)"""

    answer: str = ""
    mine: bool = False
    carried: dict[str, str] = {}  # replaced, never changed


@dataclass
class Durability:
    client: redis.Redis
    waitaof: bool = False
    replicas: int = 0
    fsync_always: bool = False
    eviction: str = "noeviction"
    probed_at: float = field(default_factory=time.monotonic)

    @classmethod
    def probe(cls, client: redis.Redis) -> Durability:
        found = cls(client)
        found._read()
        if found.evicts_any_key:
            raise ConfigError(f"Redis maxmemory-policy is {found.eviction}: when memory is "
                              "full it may evict a job's record, its generation id included, "
                              "and a paid video is then lost or paid for twice; set "
                              "maxmemory-policy noeviction (volatile-* is tolerated)")
        if found.eviction.startswith("volatile"):
            log.warning("Redis maxmemory-policy is %s: when memory is full, records with a "
                        "TTL (429 pauses, worker heartbeats, finished jobs, webhook "
                        "deliveries) may vanish early; noeviction is safer", found.eviction)
        durable = found.acknowledged_is_durable
        (log.info if durable else log.warning)(
            "durability of the POST marker: %s%s", found.describe(),
            "" if durable else ": a Redis crash may lose the marker of a POST just sent, "
                               "and that job would be POSTed again")
        return found

    @property
    def acknowledged_is_durable(self) -> bool:
        """Whether a write Redis answered survives its crash (on disk or on
        every replica); not with appendfsync everysec or no AOF."""
        return bool(self.waitaof or self.fsync_always or self.replicas)

    @property
    def evicts_any_key(self) -> bool:
        return self.eviction.startswith("allkeys")

    def _read(self) -> None:
        """What the server this client reaches (the master, through Sentinel) offers."""
        server = self.client.info("server")
        persistence = self.client.info("persistence")
        # INFO, not CONFIG: managed Redis often disables CONFIG.
        self.eviction = str(self.client.info("memory").get("maxmemory_policy", "noeviction"))
        replication = self.client.info("replication")
        version = tuple(int(p) for p in str(server.get("redis_version", "0")).split(".")[:2])
        aof = bool(persistence.get("aof_enabled"))
        self.waitaof = aof and version >= (7, 2)
        self.replicas = int(replication.get("connected_slaves", 0))
        self.fsync_always = False
        # CONFIG is often disabled on managed Redis: then nothing is claimed.
        with contextlib.suppress(redis.ResponseError):
            self.fsync_always = aof and self.client.config_get("appendfsync").get(
                "appendfsync") == "always"
        self.probed_at = time.monotonic()

    def refresh(self) -> None:
        before = self.describe()
        self._read()
        if self.describe() != before:
            log.warning("durability of the POST marker changed (failover or replica lost "
                        "or added): was %s, now %s", before, self.describe())

    def describe(self) -> str:
        parts = []
        if self.waitaof:
            parts.append("WAITAOF (fsynced locally)")
        if self.fsync_always:
            parts.append("appendfsync always")
        if self.replicas:
            parts.append(f"WAIT for {self.replicas} replica(s)")
        return ", ".join(parts) or "NOT durable (no AOF with fsync, no replicas)"

    def append_waits(self, pipe) -> None:
        """Queue the waits on the pipeline that wrote: WAIT and WAITAOF only
        cover earlier writes of the same connection."""
        if time.monotonic() - self.probed_at > REPROBE_S:
            self.refresh()  # a replica added (or gone) since the last look
        if self.waitaof:
            pipe.execute_command("WAITAOF", 1, 0, WAIT_TIMEOUT_MS)
        if self.replicas:
            pipe.execute_command("WAIT", self.replicas, WAIT_TIMEOUT_MS)

    def check(self, answers: list) -> None:
        if self.evicts_any_key:  # changed since the worker started (refresh)
            raise NotDurable(f"Redis maxmemory-policy is {self.eviction}: the POST marker "
                             "may be evicted")
        # Told apart by their shape, not by this object's flags: another thread
        # (a late POST's) may refresh them between append_waits and here.
        for answer in answers:
            if isinstance(answer, redis.ResponseError):
                # The server no longer does what it was probed doing (AOF
                # turned off at runtime: WAITAOF refused): look again, and the
                # next try waits for what it does now.
                self.refresh()
                raise NotDurable(f"Redis refused the wait for the POST marker ({answer})")
            if isinstance(answer, list | tuple):  # WAITAOF: [local fsyncs, replicas]
                if int(answer[0]) < 1:
                    raise NotDurable("WAITAOF: the POST marker was not fsynced in time")
            else:
                self._check_replicas(int(answer))

    def _check_replicas(self, acknowledged: int) -> None:
        if acknowledged >= self.replicas:
            return
        expected = self.replicas
        self.refresh()  # on the current master: after a failover it has fewer
        if acknowledged < self.replicas or self.replicas >= expected:
            raise NotDurable(f"WAIT: {acknowledged} of {expected} replicas have the POST marker")
        log.warning("POST marker acknowledged by %d replica(s), all the current master has "
                    "(was %d): %s", acknowledged, expected, self.describe())


def settling_run(client: redis.Redis, durability: Durability | None) -> str:
    """The run id of the Redis about to be written, if a write it acknowledges
    may still be lost in a crash (everysec, no AOF); '' if not."""
    if durability is None or durability.acknowledged_is_durable:
        return ""
    return str(client.info("server").get("run_id", ""))


def same_run_after(client: redis.Redis, run: str) -> bool:
    """Whether the Redis that acknowledged a write still runs SETTLE_S later,
    when even everysec has written it to disk. A crash meanwhile may have lost
    it: restarted, Redis has another run id. (A Redis down now raises.)"""
    time.sleep(SETTLE_S)
    return str(client.info("server").get("run_id", "")) == run
