"""Make a write durable before acting on it: the "POST started" marker must
survive a Redis crash or failover, or a recovered submit could POST again.

What each Redis setting guarantees (the README's Reliability section):

    Redis >= 7.2 with AOF on        WAITAOF 1 0: the marker is fsynced locally first
    replicas connected              WAIT n: every replica has the marker first
    Redis < 7.2, appendfsync always every write is fsynced before the reply
    appendfsync everysec / no AOF   up to ~1 s (or everything) may be lost on a crash:
                                    a job POSTed in that window may be POSTed again

`vidq run`'s private Redis uses AOF with appendfsync always.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)
WAIT_TIMEOUT_MS = 2000


class NotDurable(redis.RedisError):
    """The marker did not reach disk or the replicas in time: do not POST."""


@dataclass
class Durability:
    client: redis.Redis
    waitaof: bool = False
    replicas: int = 0
    fsync_always: bool = False

    @classmethod
    def probe(cls, client: redis.Redis) -> Durability:
        server = client.info("server")
        persistence = client.info("persistence")
        replication = client.info("replication")
        version = tuple(int(p) for p in str(server.get("redis_version", "0")).split(".")[:2])
        aof = bool(persistence.get("aof_enabled"))
        found = cls(client, waitaof=aof and version >= (7, 2),
                    replicas=int(replication.get("connected_slaves", 0)))
        # CONFIG is often disabled on managed Redis: then nothing is claimed.
        with contextlib.suppress(redis.ResponseError):
            found.fsync_always = aof and client.config_get("appendfsync").get(
                "appendfsync") == "always"
        log.info("durability of the POST marker: %s", found.describe())
        return found

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
        if self.waitaof:
            pipe.execute_command("WAITAOF", 1, 0, WAIT_TIMEOUT_MS)
        if self.replicas:
            pipe.execute_command("WAIT", self.replicas, WAIT_TIMEOUT_MS)

    def check(self, answers: list) -> None:
        answers = list(answers)
        if self.waitaof and int(answers.pop(0)[0]) < 1:
            raise NotDurable("WAITAOF: the POST marker was not fsynced in time")
        if self.replicas and int(answers.pop(0)) < self.replicas:
            raise NotDurable(f"WAIT: not all {self.replicas} replicas have the POST marker")
