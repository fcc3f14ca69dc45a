"""Batch progress: counts by state, a live bar, and the closing summary."""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from worker import keys
from worker.admission import Admission
from worker.jobs import JobStore


def batch_status(admission: Admission, batch: str) -> dict:
    store: JobStore = admission.store
    counts = store.counts(batch)
    return {
        "batch": batch,
        "total": store.batch_total(batch),
        "counts": counts,
        "finished": counts["done"] + counts["failed"],
        "outcome_unknown": store.outcome_unknown(batch),
        "upstream_in_flight": admission.in_flight(),
        "max_in_flight": admission.cap(),
        "effective_max_in_flight": admission.effective_cap(),
        "waiting_for_slot": admission.waiting(),
    }


def is_finished(status: dict) -> bool:
    return status["total"] > 0 and status["finished"] >= status["total"]


def watch(admission: Admission, batch: str, console: Console, *,
          interval_s: float = 1.0, keep_going=lambda: True) -> dict:
    """A live bar until every job is done or failed (or keep_going() is False)."""
    status = batch_status(admission, batch)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(batch, total=status["total"], detail="")
        while True:
            bar.update(task, total=status["total"], completed=status["finished"],
                       detail=describe(status))
            if is_finished(status) or not keep_going():
                return status
            time.sleep(interval_s)
            status = batch_status(admission, batch)


def describe(status: dict) -> str:
    counts = status["counts"]
    parts = [f"{counts[s]} {s}" for s in ("done", "failed", "downloading", "overdue",
                                           "generating", "submitted") if counts[s]]
    if status.get("outcome_unknown"):
        parts.append(f"{status['outcome_unknown']} outcome unknown (may have been charged)")
    parts.append(f"{status['upstream_in_flight']} in flight")
    if status.get("effective_max_in_flight"):
        parts.append(f"C lowered to {status['effective_max_in_flight']} of "
                     f"{status['max_in_flight']} after 429s")
    return ", ".join(parts)


def failures(store: JobStore, batch: str, limit: int = 20) -> list[tuple[str, str]]:
    """(job id, reason) of failed jobs, up to `limit`; pipelined for big batches."""
    found: list[tuple[str, str]] = []
    ids = store.job_ids(batch)
    for start in range(0, len(ids), 5000):
        pipe = store.redis.pipeline(transaction=False)
        for job_id in ids[start:start + 5000]:
            pipe.hmget(keys.job(keys.job_ref(batch, job_id)), "state", "last_error")
        for job_id, (state, reason) in zip(ids[start:start + 5000], pipe.execute(), strict=True):
            if state == "failed":
                found.append((job_id, reason or ""))
                if len(found) >= limit:
                    return found
    return found
