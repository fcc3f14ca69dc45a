"""Credits: what a job is expected to cost, and what batches and days spent.

A job commits its estimate when the pump admits it (`credits_pending` on
the job; `credits_committed` on the batch and the UTC day of admission), and
the commitment turns into spent credits when its generation ends
(`lua/settle.lua`): the upstream's `meta.usage.credits_used` when it reports
it, else the estimate. A failed job whose generation may exist (an id, or a
POST with an unknown outcome) counts its estimate as spent, since it may have
been charged; one the upstream refused costs nothing. The spend caps compare
committed + spent + the next job's estimate with the limit, so in-flight
generations can never carry a batch or a day past it.

Estimates come from settings (`VIDQ_CREDIT_ESTIMATE`, and per model and
resolution `VIDQ_CREDIT_ESTIMATES`), are stored on each job when it is
enqueued, and are what the caps count until the real figure arrives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import redis

from . import keys
from .contract import CREDITS_PER_VIDEO_ESTIMATE, shape_of
from .errors import ConfigError

# A day's spend record outlives the day long enough for a weekly look back.
SPEND_TTL_S = 8 * 86400
DAY_S = 86400


@dataclass(frozen=True)
class CreditEstimates:
    """Credits one generation is expected to cost, by (model, resolution)."""

    default: float = CREDITS_PER_VIDEO_ESTIMATE
    table: dict[tuple[str, str], float] = field(default_factory=dict)

    def of(self, request: dict) -> float:
        shape = shape_of(request)
        return self.table.get(shape, self.default)

    @classmethod
    def from_settings(cls, settings) -> CreditEstimates:
        return cls(settings.credit_estimate, parse_estimates(settings.credit_estimates))


def parse_estimates(raw: str) -> dict[tuple[str, str], float]:
    """`model@RESOLUTION=credits,...` (VIDQ_CREDIT_ESTIMATES) as a table."""
    table: dict[tuple[str, str], float] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        shape, _, number = item.partition("=")
        model, _, resolution = shape.strip().partition("@")
        try:
            credits = float(number)
        except ValueError:
            credits = -1.0
        if not (model and resolution and math.isfinite(credits) and credits >= 0):
            raise ConfigError(f"VIDQ_CREDIT_ESTIMATES: {item!r} is not "
                              "model@RESOLUTION=credits (e.g. alibaba/wan2.1-t2v-turbo@480P=60000)")
        table[(model, resolution)] = credits
    return table


def today(client: redis.Redis) -> int:
    """The UTC day number (days since the epoch) by the Redis clock."""
    seconds, _ = client.time()
    return int(seconds) // DAY_S


def batch_spend(client: redis.Redis, batch: str) -> dict:
    """Spent and committed credits, videos and caps of one batch."""
    raw = client.hmget(keys.batch(batch), "credits_spent", "credits_committed", "videos",
                       "max_credits", "max_videos", "blocked")
    spent, committed, videos, max_credits, max_videos, blocked = raw
    return {"spent": amount(spent), "committed": amount(committed),
            "videos": int(amount(videos)), "max_credits": _optional(max_credits),
            "max_videos": _optional(max_videos), "spend_cap_reached": blocked == "spend cap"}


def day_spend(client: redis.Redis, day: int | None = None) -> dict:
    """Spent and committed credits of a UTC day (today by default), and the daily cap."""
    day = today(client) if day is None else day
    spent, committed = client.hmget(keys.spend_day(day), "spent", "committed")
    cap = client.hget(keys.CONFIG, "daily_credits")
    return {"day": day, "spent": amount(spent), "committed": amount(committed),
            "daily_credits": _optional(cap)}


def spend_summary(client: redis.Redis, batch: str) -> dict:
    """What `vidq status` shows: the batch's spend and today's, one object."""
    return {"batch": batch_spend(client, batch), "today": day_spend(client)}


def amount(raw) -> float:
    """Credits as stored (a Redis string) or written (a manifest row's value);
    0 where there is none or it is not a number."""
    try:
        return max(0.0, float(raw)) if raw is not None else 0.0
    except (TypeError, ValueError):
        return 0.0


def _optional(raw) -> float | None:
    return float(raw) if raw not in (None, "") else None
