"""The exporter's view: a prometheus-client collector that reads Redis on
every scrape. Counters and histograms come from the `vidq:metrics` hash the
workers add to (`worker.metrics`); gauges come from the state vidq keeps
anyway (batch counts, the slot set, C, the waiting lines, spend, heartbeats),
so they are right even for work done before the exporter started.

One exporter serves a whole deployment (it reads shared state): run one,
not one per worker, or Prometheus would sum the same figures twice.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import keys
from .jobs import State
from .metrics import BY_NAME, UPSTREAM_SECONDS, Spec, parse_field

DAY_S = 86400
log = logging.getLogger(__name__)


class VidqCollector(Collector):
    """Everything `vidq metrics` exports, read from Redis at scrape time."""

    def __init__(self, client: redis.Redis, heartbeat_ttl_s: float):
        self.redis = client
        self.heartbeat_ttl_s = heartbeat_ttl_s

    def collect(self) -> Iterator[Metric]:
        # All or nothing: a scrape with some families missing would read as
        # counter resets. Without Redis, only vidq_redis_up (0) is served.
        try:
            families = [*recorded(self.redis.hgetall(keys.METRICS)), *batch_gauges(self.redis),
                        *deployment_gauges(self.redis),
                        *worker_gauges(self.redis, self.heartbeat_ttl_s)]
        except redis.RedisError as exc:
            log.warning("scrape without Redis: %s: %s", type(exc).__name__, exc)
            families = []
        yield from families
        yield _gauge("vidq_redis_up", "1 if the exporter read Redis for this scrape, else 0.",
                     1 if families else 0)


def recorded(raw: dict) -> Iterator[Metric]:
    """Counter and histogram families from the hash's fields."""
    counters: dict[str, dict[tuple, float]] = defaultdict(dict)
    buckets: dict[str, dict[tuple, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for field, value in raw.items():
        parsed = parse_field(str(field))
        if parsed is None or parsed[1] not in BY_NAME:
            continue
        kind, name, values, bucket = parsed
        if kind == "c":
            counters[name][values] = float(value)
        else:
            buckets[name][values][bucket] = float(value)
    for spec in BY_NAME.values():
        if spec.kind == "counter":
            family = CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
            series = counters[spec.name] or ({(): 0.0} if not spec.labels else {})
            for values, total in sorted(series.items()):
                family.add_metric(list(values), total)  # unlabelled ones start at 0
            yield family
        else:
            yield from histogram(spec, buckets[spec.name])


def histogram(spec: Spec, series: dict[tuple, dict[str, float]]) -> Iterator[Metric]:
    family = HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)
    totals = CounterMetricFamily("vidq_upstream_requests", "Upstream calls by type and "
                                 "outcome (the count of vidq_upstream_request_seconds).",
                                 labels=spec.labels)
    bounds = (*spec.buckets, float("inf"))
    for values, stored in sorted(series.items()):
        per_bucket = [0.0] * len(bounds)
        for le, count in stored.items():
            if le != "sum":
                # A bucket stored under bounds since changed counts in the next one up.
                per_bucket[next(i for i, b in enumerate(bounds) if _bound(le) <= b)] += count
        cumulative = [sum(per_bucket[:i + 1]) for i in range(len(bounds))]
        family.add_metric(list(values), [(_le(b), c) for b, c in zip(bounds, cumulative,
                                                                     strict=True)],
                          stored.get("sum", 0.0))
        totals.add_metric(list(values), cumulative[-1])
    yield family
    if spec is UPSTREAM_SECONDS:
        yield totals  # the same counts as a counter: 429s and 5xx read simply


def batch_gauges(client: redis.Redis) -> Iterator[Metric]:
    """Jobs by state, waiting, outcome unknown and credits, per batch."""
    names = sorted(str(name) for name in client.smembers(keys.BATCHES))
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.batch_counts(name))
        pipe.hmget(keys.batch(name), "total", "credits_spent", "credits_committed")
        pipe.zcard(keys.batch_line(name))
        pipe.scard(keys.batch_unknown(name))
    answers = pipe.execute()
    jobs = GaugeMetricFamily("vidq_jobs", "Jobs in each state, per batch.",
                             labels=("batch", "state"))
    total = GaugeMetricFamily("vidq_batch_jobs", "Jobs enqueued in the batch.", labels=("batch",))
    backlog = GaugeMetricFamily("vidq_backlog", "Jobs waiting for an upstream slot (admission "
                                "backlog), per batch.", labels=("batch",))
    unknown = GaugeMetricFamily("vidq_jobs_outcome_unknown", "Jobs failed with an unknown POST "
                                "outcome (may have been charged), per batch.", labels=("batch",))
    spent = GaugeMetricFamily("vidq_batch_credits_spent", "Credits spent by the batch's "
                              "ended generations.", labels=("batch",))
    committed = GaugeMetricFamily("vidq_batch_credits_committed", "Credits committed by the "
                                  "batch's generations in flight.", labels=("batch",))
    for index, name in enumerate(names):
        counts, (raw_total, raw_spent, raw_committed), line, lost = answers[4 * index:4 * index + 4]
        for state in State:
            jobs.add_metric([name, state.value], _number(counts.get(state.value)))
        total.add_metric([name], _number(raw_total))
        backlog.add_metric([name], line)
        unknown.add_metric([name], lost)
        spent.add_metric([name], _number(raw_spent))
        committed.add_metric([name], _number(raw_committed))
    yield from (jobs, total, backlog, unknown, spent, committed)


def deployment_gauges(client: redis.Redis) -> Iterator[Metric]:
    """In flight against C (configured and effective), pauses, today's spend."""
    seconds, _ = client.time()
    pipe = client.pipeline(transaction=False)
    pipe.zcard(keys.SLOTS)
    pipe.hmget(keys.CONFIG, "max_in_flight", "effective_cap", "daily_credits")
    pipe.pttl(keys.PAUSE_SUBMIT)
    pipe.pttl(keys.PAUSE_POLL)
    pipe.hmget(keys.spend_day(int(seconds) // DAY_S), "spent", "committed")
    in_flight, (cap, effective, daily), submit_ms, poll_ms, (spent, committed) = pipe.execute()
    configured = _number(cap)
    lowered = _number(effective) if effective else configured
    yield _gauge("vidq_in_flight", "Generations holding an upstream slot.", in_flight)
    yield _gauge("vidq_cap_configured", "C: the deployment's configured concurrency "
                 "(VIDQ_MAX_IN_FLIGHT, `vidq cap`).", configured)
    yield _gauge("vidq_cap_effective", "C as lowered after 429s showed a lower account "
                 "limit; equal to C when not lowered.", min(lowered, configured))
    pauses = GaugeMetricFamily("vidq_pause_seconds", "Seconds left of the pause a 429 put on "
                               "submits or status GETs (0: none).", labels=("call",))
    pauses.add_metric(["submit"], max(submit_ms, 0) / 1000)
    pauses.add_metric(["status"], max(poll_ms, 0) / 1000)
    yield pauses
    yield _gauge("vidq_credits_spent_today", "Credits spent today (UTC, Redis clock).",
                 _number(spent))
    yield _gauge("vidq_credits_committed_today", "Credits committed today by generations "
                 "in flight.", _number(committed))
    yield _gauge("vidq_daily_credit_cap", "The deployment's daily credit cap (0: none).",
                 _number(daily))


def worker_gauges(client: redis.Redis, heartbeat_ttl_s: float) -> Iterator[Metric]:
    """Workers running steps whose heartbeat key is alive (as `vidq status`
    counts them: a webhook-only pool moves no job), and how old each live
    heartbeat is, webhook pools included."""
    names = sorted(str(key) for key in client.scan_iter(keys.WORKER_PREFIX + "*", count=1000))
    pipe = client.pipeline(transaction=False)
    for key in names:
        pipe.pttl(key)
        pipe.get(key)
    replies = pipe.execute()
    ages = GaugeMetricFamily("vidq_worker_heartbeat_age_seconds", "Seconds since each live "
                             "worker's last heartbeat.", labels=("worker",))
    alive = 0
    for key, ttl_ms, runs in zip(names, replies[::2], replies[1::2], strict=True):
        if ttl_ms > 0:
            alive += runs not in keys.NOT_TAKING_STEPS
            ages.add_metric([key.removeprefix(keys.WORKER_PREFIX)],
                            max(heartbeat_ttl_s - ttl_ms / 1000, 0.0))
    yield _gauge("vidq_workers_alive", "Worker instances running steps with a live "
                 "heartbeat (webhook-only pools and stopping workers are not counted).", alive)
    yield ages


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _number(raw) -> float:
    try:
        return float(raw) if raw not in (None, "") else 0.0
    except ValueError:
        return 0.0


def _bound(le: str) -> float:
    return float("inf") if le == "+Inf" else float(le)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
