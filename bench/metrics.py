"""Turning ledgers, stats and timestamps into the numbers of one table row."""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

MB = 1_000_000


@dataclass
class Row:
    name: str
    n_run: int
    n_target: int
    makespan_s: float
    ideal_s: float
    gets_median: float
    gets_mean: float
    max_in_flight: int
    rate_limited: int
    worker_peak_rss_mb: float
    redis_cmds_per_job: float
    failed: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def extrapolated(self) -> bool:
        return self.n_run < self.n_target

    @property
    def efficiency(self) -> float:
        return self.ideal_s / self.makespan_s if self.makespan_s else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "efficiency": self.efficiency, "extrapolated": self.extrapolated}


def generation_seconds(entries: list[dict]) -> list[float]:
    return [e["completes_at"] - e["submitted_at"] for e in entries]


def build_row(name: str, n_target: int, c: int, entries: list[dict], stats: dict,
              stored_at: list[float], rss_bytes: int, redis_calls: int, note: str = "") -> Row:
    """A row from the run's ledger; makespan/ideal scaled to n_target if fewer ran."""
    n_run = len(stored_at)
    scale = n_target / n_run if n_run else 0.0
    makespan = max(stored_at) - min(e["submitted_at"] for e in entries) if n_run else 0.0
    polls = [e["polls"] for e in entries]
    return Row(
        name=name, n_run=n_run, n_target=n_target, makespan_s=makespan * scale,
        ideal_s=sum(generation_seconds(entries)) / c * scale,
        gets_median=statistics.median(polls) if polls else 0.0,
        gets_mean=statistics.fmean(polls) if polls else 0.0,
        max_in_flight=stats["max_in_flight"], rate_limited=stats["rate_limited"],
        worker_peak_rss_mb=rss_bytes / MB,
        redis_cmds_per_job=redis_calls / n_run if n_run else 0.0,
        failed=len(entries) - n_run, note=note,
        extra={"measured_makespan_s": makespan, "generations": len(entries)})


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def detection_lag(jobs: list[dict], entries: list[dict], generation_s: float) -> dict:
    """vidq's completed_at minus the sandbox's completes_at, per generation."""
    completes = {e["id"]: e["completes_at"] for e in entries}
    lags = [float(job["completed_at"]) - completes[job["generation_id"]]
            for job in jobs if job.get("completed_at") and job.get("generation_id") in completes]
    median, p95 = statistics.median(lags) if lags else math.nan, percentile(lags, 0.95)
    return {"count": len(lags), "median_s": median, "p95_s": p95,
            "mean_s": statistics.fmean(lags) if lags else math.nan,
            "median_of_T": median / generation_s, "p95_of_T": p95 / generation_s,
            "max_s": max(lags) if lags else math.nan}


def cycle_breakdown(jobs: list[dict], entries: list[dict], c: int) -> dict:
    """Where a slot's time goes between two generations (medians, seconds)."""
    ledger = {e["id"]: e for e in entries}
    pairs = [(j, ledger[j["generation_id"]]) for j in jobs if j.get("generation_id") in ledger]

    def median_of(values):
        values = list(values)
        return statistics.median(values) if values else math.nan

    first = min(e["submitted_at"] for e in entries)
    last_done = max(e["completes_at"] for e in entries)
    return {
        "admitted_to_upstream_submit_s": median_of(
            e["submitted_at"] - float(j["admitted_at"]) for j, e in pairs if j.get("admitted_at")),
        "completion_to_download_done_s": median_of(
            float(j["downloaded_at"]) - float(j["completed_at"])
            for j, _ in pairs if j.get("downloaded_at") and j.get("completed_at")),
        "slot_utilization": sum(generation_seconds(entries)) / (c * (last_done - first)),
        "tail_after_last_completion_s": max(
            float(j.get("downloaded_at") or 0) for j in jobs) - last_done,
    }
