"""What a `vidq` command does when Redis cannot be used: one readable error
line, or, for `report` and `status`, the batch's manifest in storage in its
place when nothing listens (a `vidq run` over, its private Redis stopped)."""
from __future__ import annotations

import click
import redis

from worker.manifest import manifest_key
from worker.netguard import redacted
from worker.settings import Settings
from worker.storage import open_storage


def redis_error_text(exc: Exception) -> str:
    """One readable line. A Sentinel's "No master found" carries the repr of
    every connection pool it tried: over 1,000 characters of noise."""
    text = str(exc).split(" : <", 1)[0].split(" : {", 1)[0]
    if type(exc).__name__ == "MasterNotFoundError":
        text += " (are the Sentinels up, and is the master's name right?)"
    text = text if len(text) <= 300 else text[:299] + "…"
    return f"cannot use Redis (VIDQ_REDIS_URL): {type(exc).__name__}: {text}"


def redis_gone(client, settings: Settings, batch: str) -> bool:
    """Whether Redis cannot be reached and the batch's manifest in storage
    stands in for it: a `vidq run` is over and its private Redis stopped with
    it, or VIDQ_REDIS_URL is unset and nothing runs on the default (said on
    stderr). With no manifest either, the Redis error stands."""
    try:
        client.ping()
        return False
    except redis.ConnectionError as exc:
        # Only nothing listening: a refused login, a Redis still loading or a
        # Sentinel without a master is a Redis that holds the live batch.
        if type(exc) is not redis.ConnectionError:
            raise
        try:
            found = open_storage(settings.storage_url, settings.s3_part_bytes).exists(
                manifest_key(batch))
        except Exception:  # storage down too: the Redis error is what to fix first
            found = False
        if not found:
            raise
    click.echo(f"Redis at {redacted(settings.redis_url)} cannot be reached: batch "
               f"{batch} is read from its manifest in storage, as it was when written",
               err=True)
    return True
