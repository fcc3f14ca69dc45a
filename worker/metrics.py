"""The metrics vidq exports, named once: what the workers count into Redis
(`worker.metrics_record`) and what the exporter reads back
(`worker.metrics_collector`, served by `vidq metrics --port N`).

Why Redis and not a per-process prometheus-client registry: a Celery prefork
worker runs each task in one of several child processes, on several hosts,
and children are replaced; per-process counters would need prometheus-client's
multiprocess directory per host and a scrape target per worker. Here each step
adds its counts to one Redis hash (`vidq:metrics`) in one pipeline when it
ends, so one exporter anywhere sees the whole deployment, and a restarted
worker loses nothing. Labels are bounded: call type, HTTP outcome class,
model, resolution, batch name; never a job or generation id.

A counter or histogram sample is one hash field:

    c|<name>|<labels as JSON>           counter value
    h|<name>|<labels as JSON>|<le>      observations in the bucket ending at le
    h|<name>|<labels as JSON>|sum       sum of the observations
"""
from __future__ import annotations

import json
from dataclasses import dataclass

CALLS = ("submit", "status", "download")
# Outcome of one upstream call, by HTTP status class or by what went wrong
# before a status arrived.
OUTCOMES = ("2xx", "429", "3xx", "4xx", "5xx", "timeout", "network", "answer_lost",
            "bad_body", "refused")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GENERATION_BUCKETS = (5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 75.0, 90.0, 105.0, 120.0, 150.0,
                      180.0, 240.0, 300.0, 450.0, 600.0, 900.0, 1800.0)
LAG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
GETS_BUCKETS = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0)


@dataclass(frozen=True)
class Spec:
    """One metric family: its exported name (without `_total`), kind and labels."""

    name: str
    kind: str  # "counter" or "histogram"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


UPSTREAM_SECONDS = Spec(
    "vidq_upstream_request_seconds", "histogram",
    "Upstream call latency (submit POST, status GET, result download until its headers), "
    "by call type and outcome.", ("call", "outcome"), LATENCY_BUCKETS)
GENERATION_SECONDS = Spec(
    "vidq_generation_seconds", "histogram",
    "Generation time from submit: the midpoint between the last pending poll and the poll "
    "that found it done; half that poll's time when the first poll found it done.",
    ("model", "resolution"), GENERATION_BUCKETS)
DETECTION_LAG_SECONDS = Spec(
    "vidq_detection_lag_seconds", "histogram",
    "Estimated time between a generation finishing and a poll seeing it: half the last poll "
    "interval, for completions bracketed by two polls (first-poll completions are not "
    "observed here).", ("model", "resolution"), LAG_BUCKETS)
STATUS_GETS_PER_VIDEO = Spec(
    "vidq_status_gets_per_video", "histogram",
    "Status GETs answered for one generation until it was seen done.",
    ("model", "resolution"), GETS_BUCKETS)
COMPLETIONS = Spec(
    "vidq_completions", "counter",
    "Generations seen done, by whether the first poll found them done (censored).",
    ("model", "resolution", "seen"))
DOWNLOADS = Spec("vidq_downloads", "counter", "Videos streamed into storage.")
DOWNLOAD_BYTES = Spec("vidq_download_bytes", "counter", "Bytes of videos streamed into storage.")
DOWNLOAD_SECONDS = Spec("vidq_download_seconds", "counter",
                        "Seconds spent streaming videos into storage (sidecar excluded).")
JOB_FAILURES = Spec(
    "vidq_job_failures", "counter",
    "Jobs that ended failed, by kind: outcome_unknown, timeout (hard limit), gave_up "
    "(attempts spent), link_refused, rejected (submit), generation_failed (poll), "
    "download_refused, other.", ("kind",))
RESENDS = Spec("vidq_reconciler_resends", "counter",
               "Steps the reconciler sent again (a dead worker's, or one past its due time).")

SPECS = (UPSTREAM_SECONDS, GENERATION_SECONDS, DETECTION_LAG_SECONDS, STATUS_GETS_PER_VIDEO,
         COMPLETIONS, DOWNLOADS, DOWNLOAD_BYTES, DOWNLOAD_SECONDS, JOB_FAILURES, RESENDS)
BY_NAME = {spec.name: spec for spec in SPECS}


def labels_json(values: tuple[str, ...]) -> str:
    return json.dumps(list(values), separators=(",", ":"))


def counter_field(spec: Spec, values: tuple[str, ...]) -> str:
    return f"c|{spec.name}|{labels_json(values)}"


def bucket_field(spec: Spec, values: tuple[str, ...], value: float) -> str:
    """The field of the first bucket that holds `value` (`+Inf` past the last)."""
    upper = next((bound for bound in spec.buckets if value <= bound), None)
    return f"h|{spec.name}|{labels_json(values)}|{'+Inf' if upper is None else repr(upper)}"


def sum_field(spec: Spec, values: tuple[str, ...]) -> str:
    return f"h|{spec.name}|{labels_json(values)}|sum"


def parse_field(field: str) -> tuple[str, str, tuple[str, ...], str] | None:
    """(kind, name, label values, bucket or '') of a stored field; None if unreadable."""
    kind, _, rest = field.partition("|")
    name, _, rest = rest.partition("|")
    bucket = ""
    if kind == "h":
        rest, _, bucket = rest.rpartition("|")
    try:
        values = json.loads(rest)
    except ValueError:
        return None
    if kind not in ("c", "h") or not isinstance(values, list):
        return None
    return kind, name, tuple(str(v) for v in values), bucket
