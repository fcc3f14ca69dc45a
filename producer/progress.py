"""Batch progress: the status line, `--watch` (a bar per state, rate, ETA and
warnings), and the closing summary.

On a terminal `--watch` redraws bars; when standard output is not a terminal
(a log file, CI) it prints one plain progress line every `every_s` seconds
instead, so a log shows the night's progress and nothing is lost to control
codes. Either way it ends when every job has ended, and its exit status says
whether any failed (with the top reasons).
"""
from __future__ import annotations

import time
from collections.abc import Callable

import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from worker.admission import Admission
from worker.jobs import JobStore
from worker.retry import failures as failed_jobs
from worker.settings import Settings

from .batch_view import SPIKE_WINDOW_S, batch_status

REDIS_AWAY_S = 300.0  # a restart or failover takes seconds; longer is an outage
__all__ = ["batch_status", "describe", "failures", "is_finished", "warnings", "watch"]
# (label, states) of each bar, in the order they are drawn.
BARS = (("done", ("done",)), ("failed", ("failed",)), ("cancelled", ("cancelled",)),
        ("in flight", ("submitted", "generating", "overdue", "downloading")),
        ("waiting", ("queued",)))


def is_finished(status: dict) -> bool:
    return status["total"] > 0 and status["finished"] >= status["total"]


def watch(admission: Admission, batch: str, console: Console, *, settings: Settings | None = None,
          interval_s: float = 1.0, every_s: float = 30.0,
          keep_going: Callable[[], bool] = lambda: True) -> dict:
    """Follow the batch until every job has ended (or keep_going() is False)."""
    if console.is_terminal:
        return _bars(admission, batch, console, settings, interval_s, keep_going)
    return _lines(admission, batch, console, settings, interval_s, every_s, keep_going)


def _bars(admission, batch, console, settings, interval_s, keep_going) -> dict:
    status = batch_status(admission, batch, settings)
    columns = (TextColumn("{task.description:>10}"), BarColumn(bar_width=30),
               MofNCompleteColumn(), TextColumn("{task.fields[detail]}"))
    warned: set[str] = set()
    with Progress(*columns, console=console, transient=False) as bars:
        tasks = {label: bars.add_task(label, total=status["total"], detail="")
                 for label, _ in BARS}
        while True:
            details = bar_details(status)
            for label, states in BARS:
                bars.update(tasks[label], total=status["total"], detail=details.get(label, ""),
                            completed=sum(status["counts"].get(s, 0) for s in states))
            for warning in set(warnings(status)) - warned:  # once each, above the bars
                bars.console.print(f"warning: {warning}", highlight=False)
                warned.add(warning)
            if is_finished(status) or not keep_going():
                return status
            time.sleep(interval_s)
            status = _next_status(admission, batch, settings, console, interval_s, keep_going)


def _next_status(admission, batch, settings, console, interval_s,
                 keep_going: Callable[[], bool] = lambda: True) -> dict:
    """The next status. A Redis away for a while (a restart, a failover) is
    waited for, not an error: the batch runs on meanwhile, and the watch's
    exit status is for its outcome. Not once keep_going() is False (the
    run's own Redis stopped: nothing will bring it back)."""
    away_since = None
    while True:
        try:
            return batch_status(admission, batch, settings)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if not keep_going():
                raise
            if away_since is None:
                away_since = time.monotonic()
                console.print(f"warning: Redis unreachable ({type(exc).__name__}); watching "
                              f"again when it is back (up to {REDIS_AWAY_S:.0f} s)",
                              highlight=False, soft_wrap=True)
            if time.monotonic() - away_since > REDIS_AWAY_S:
                raise
            time.sleep(interval_s)


def bar_details(status: dict) -> dict[str, str]:
    """The short text beside each bar: rate and ETA, and the deployment's figures."""
    deployment = status["deployment"]
    eta = f"ETA {duration(status['eta_s'])}"
    if not status["eta_basis"].startswith(("observed rate", "finished")):
        eta += " (estimated)"
    return {"done": f"{status['rate_per_min']:g}/min, {eta}",
            "failed": f"{status['outcome_unknown']} outcome unknown"
            if status["outcome_unknown"] else "",
            "in flight": f"deployment: {deployment['in_flight']} of {_cap(status)}",
            "waiting": f"deployment: {deployment['waiting']}"}


def _lines(admission, batch, console, settings, interval_s, every_s, keep_going) -> dict:
    status = batch_status(admission, batch, settings)
    printed_at = -every_s
    while True:
        if time.monotonic() - printed_at >= every_s or is_finished(status):
            console.print(f"{batch}: {summary_line(status)}", highlight=False, soft_wrap=True)
            for warning in warnings(status):
                console.print(f"warning: {warning}", highlight=False, soft_wrap=True)
            printed_at = time.monotonic()
        if is_finished(status) or not keep_going():
            return status
        time.sleep(interval_s)
        status = _next_status(admission, batch, settings, console, interval_s, keep_going)


def summary_line(status: dict) -> str:
    """`12/40 ended (10 done, 2 failed); 4 in flight, 24 waiting; 3.2/min, ETA 8 min`."""
    return (f"{status['finished']}/{status['total']} ended; {describe(status)}; "
            f"{status['rate_per_min']:g}/min, ETA {duration(status['eta_s'])}"
            + ("" if status["eta_basis"] in ("observed rate", "finished")
               else f" ({status['eta_basis']})"))


def ended_line(status: dict) -> str:
    """`10 done, 1 failed, 13 cancelled of 24`: how a finished batch ended."""
    counts = status["counts"]
    line = (f"{counts.get('done', 0)} done, {counts.get('failed', 0)} failed"
            + (f", {counts['cancelled']} cancelled" if counts.get("cancelled") else "")
            + f" of {status['total']}")
    if status.get("outcome_unknown"):
        line += (f"; {status['outcome_unknown']} failed with an unknown outcome (may have "
                 "been charged)")
    return line


def describe(status: dict, with_deployment: bool = True) -> str:
    counts = status["counts"]
    parts = [f"{counts[s]} {s}" for s in ("done", "failed", "cancelled", "downloading",
                                           "overdue", "generating", "submitted")
             if counts.get(s)]
    if status.get("outcome_unknown"):
        parts.append(f"{status['outcome_unknown']} outcome unknown (may have been charged)")
    sending = f"{status['being_sent']} being sent, " if status.get("being_sent") else ""
    parts.append(f"{status['in_flight']} in flight, {sending}{status['waiting']} waiting")
    if with_deployment:
        parts[-1] += (f" (deployment: {status['deployment']['in_flight']} in flight of "
                      f"{_cap(status)}, {status['deployment']['waiting']} waiting)")
    if status.get("effective_max_in_flight"):
        parts.append(f"C lowered to {status['effective_max_in_flight']} of "
                     f"{status['max_in_flight']} after 429s")
    if status.get("admission", "open") != "open":
        parts.append(status["admission"])
    return ", ".join(parts)


def warnings(status: dict) -> list[str]:
    """What needs a person: nobody working, failures piling up, a 429 pause."""
    found = []
    orphans = status.get("deployment", {}).get("orphaned_generations")
    if orphans:
        found.append(f"{orphans} paid generation id(s) answered after their batch was "
                     "purged: kept in the Redis hash vidq:orphans, not downloaded")
    for disagreement in status.get("deployment", {}).get("settings_disagree", []):
        found.append(f"the live workers disagree on {disagreement}")
    if not is_finished(status) and status["workers_alive"] == 0:
        found.append("no worker is alive that runs steps (no heartbeat in Redis from one "
                     "consuming vidq.submit, vidq.poll or vidq.download): nothing is being "
                     "processed")
    if status["errors_spiking"]:
        top = status["failures"]["top_reasons"][:1]
        found.append(f"{status['recent_failures']} failures in the last "
                     f"{SPIKE_WINDOW_S / 60:.0f} min"
                     + (f" (most: {top[0]['reason']})" if top else ""))
    storage = status["deployment"].get("storage_failing")
    if storage:
        found.append(f"storage failing ({storage}): no new POSTs until it works; paid "
                     "videos wait for it (their links last about 24 h)")
    not_durable = status["deployment"].get("marker_not_durable")
    if not_durable:
        found.append(f"Redis could not make the last POST marker durable ({not_durable}): "
                     "POSTs wait and are tried again every few seconds; check its replicas "
                     "(WAIT) and its AOF (WAITAOF)")
    why = status["deployment"].get("submits_paused_why")
    for call in ("submits", "polls"):
        paused = status["deployment"].get(f"{call}_paused_s")
        if paused and call == "submits" and why:
            found.append(f"the upstream refused the account ({why}): submits paused for "
                         f"{paused:g} s, then tried again; check the API key and the credits")
        elif paused and not (storage and call == "submits"):
            found.append(f"the upstream answered 429: {call} paused for {paused:g} s")
    return found


def reasons_text(status: dict) -> list[str]:
    return [f"{item['count']} x {item['reason']}" for item in status["failures"]["top_reasons"]]


def failures(store: JobStore, batch: str, limit: int = 20) -> list[tuple[str, str]]:
    """(job id, reason) of failed jobs, up to `limit` (reads only the failures)."""
    return [(failure.job_id, failure.reason) for failure in failed_jobs(store, batch)[:limit]]


def _cap(status: dict) -> str:
    cap = status["deployment"]["max_in_flight"]
    return f"C = {cap}" if cap else "C (not set: no worker has started)"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
