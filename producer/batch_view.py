"""What `vidq status` and `vidq batches` show about a batch.

Every figure is read in O(C + failures) from keys kept as jobs change
(counts, the failed set, the per-minute finish counts, the slot set), never
by walking a batch's jobs, so a 100,000-job batch answers as fast as a small
one. The batch's own figures (in flight, waiting) are kept apart from the
deployment's (every batch shares the C slots).

Rate: jobs finished per minute over the last `RATE_WINDOW_S` (or the batch's
age, if younger). ETA: what is left at that rate; before anything has
finished, the learned generation time for C at a time (marked "estimated").
"""
from __future__ import annotations

import math
import re
from collections import Counter

from worker import keys
from worker.admission import Admission
from worker.batch_control import admission_state, posted_in_flight, slot_holders
from worker.contract import DEFAULT_MODEL, DEFAULT_RESOLUTION
from worker.deployment import disagreements, running_values
from worker.durations import DurationModel
from worker.jobs import FINAL_STATES, State
from worker.retry import Failure, failures
from worker.settings import Settings
from worker.spend import batch_spend

RATE_WINDOW_S = 300.0
TOP_REASONS = 5
# Failures in this window, if at least half of what ended then, are a spike.
SPIKE_WINDOW_S, SPIKE_MIN_FAILURES = 120.0, 3


def batch_status(admission: Admission, batch: str, settings: Settings | None = None) -> dict:
    """Everything `vidq status --json` prints (`total` 0: no such batch)."""
    store, client = admission.store, admission.redis
    counts = store.counts(batch)
    total = store.batch_total(batch)
    now = store.now()
    created = float(client.hget(keys.batch(batch), "created_at") or now)
    found = failures(store, batch) if counts[State.FAILED] else []
    finished = sum(counts.get(state, 0) for state in FINAL_STATES)
    rate = finish_rate(client, batch, now, created)
    holders = slot_holders(admission, batch)  # admitted, its POST maybe on its way: 'queued'
    status = {
        "batch": batch, "total": total, "counts": counts, "finished": finished,
        "admission": admission_state(admission, batch) if total else "open",
        "in_flight": posted_in_flight(holders), "being_sent": holders.get(State.QUEUED, 0),
        "waiting": admission.waiting(batch),
        "outcome_unknown": store.outcome_unknown(batch),
        "failures": top_reasons(found), "credits": batch_spend(client, batch),
        "age_s": round(max(0.0, now - created), 1), **rate,
        "deployment": deployment(admission),
        "workers_alive": workers_alive(client),
    }
    status["eta_s"], status["eta_basis"] = eta(status, admission, settings)
    # The names `vidq status --json` had before: the deployment's figures.
    status.update(upstream_in_flight=status["deployment"]["in_flight"],
                  waiting_for_slot=status["deployment"]["waiting"],
                  max_in_flight=status["deployment"]["max_in_flight"],
                  effective_max_in_flight=status["deployment"]["effective_max_in_flight"])
    return status


def deployment(admission: Admission) -> dict:
    submits_ms = admission.redis.pttl(keys.PAUSE_SUBMIT)
    polls_ms = admission.redis.pttl(keys.PAUSE_POLL)
    return {"in_flight": admission.in_flight(), "waiting": admission.waiting(),
            "max_in_flight": admission.cap(),
            "effective_max_in_flight": admission.effective_cap(),
            "submits_paused_s": round(submits_ms / 1000, 1) if submits_ms > 0 else 0,
            # Set only when the upstream refused the account (401, 403), not on a 429.
            "submits_paused_why": admission.redis.get(keys.PAUSE_SUBMIT_WHY) or "",
            "storage_failing": admission.redis.get(keys.STORAGE_FAILING) or "",
            "marker_not_durable": admission.redis.get(keys.MARKER_NOT_DURABLE) or "",
            "polls_paused_s": round(polls_ms / 1000, 1) if polls_ms > 0 else 0,
            "orphaned_generations": admission.redis.hlen(keys.ORPHANS),
            "settings_disagree": disagreements(running_values(admission.redis))}


def finish_rate(client, batch: str, now: float, created: float) -> dict:
    """Jobs ended per minute over the recent window, and failures per minute
    over the spike window (from the per-minute counts lua/transition.lua keeps)."""
    buckets = client.hgetall(keys.batch_finished(batch))
    window = max(1.0, min(RATE_WINDOW_S, now - created))
    ended = _since(buckets, now - window, "df")
    spike_window = max(1.0, min(SPIKE_WINDOW_S, now - created))
    recent_failed = _since(buckets, now - spike_window, "f")
    recent_ended = _since(buckets, now - spike_window, "df")
    return {"rate_per_min": round(ended * 60 / window, 2), "rate_window_s": round(window),
            "recent_failures": recent_failed,
            "errors_spiking": recent_failed >= SPIKE_MIN_FAILURES
            and recent_failed * 2 >= recent_ended}


def _since(buckets: dict, start: float, kinds: str) -> int:
    first = math.floor(start / 60)
    total = 0
    for name, count in buckets.items():
        kind, _, minute = name.partition(":")
        if kind in kinds and minute.lstrip("-").isdigit() and int(minute) >= first:
            total += int(count)
    return total


def eta(status: dict, admission: Admission, settings: Settings | None) -> tuple[float | None, str]:
    left = status["total"] - status["finished"]
    if left <= 0:
        return 0.0, "finished"
    if status["waiting"] and status["admission"] != "open":
        return None, f"{status['admission']}: its waiting jobs are not admitted"
    if status["workers_alive"] == 0:
        return None, "no worker is alive"
    if status["waiting"] and status["deployment"]["submits_paused_why"]:
        # The last hour's rate says nothing of when the account is usable again.
        return None, "submits paused: the upstream refused the account"
    if status["deployment"]["storage_failing"]:
        return None, "storage failing"
    # A 429's pause (up to an hour) holds the batch back before any rate resumes.
    pause_s = max(status["deployment"]["submits_paused_s"] if status["waiting"] else 0,
                  status["deployment"]["polls_paused_s"] if status["in_flight"] else 0)
    after = f", after the 429 pause ({pause_s:.0f} s)" if pause_s else ""
    if status["rate_per_min"] > 0:
        return round(pause_s + left * 60 / status["rate_per_min"]), "observed rate" + after
    cap = status["deployment"]["effective_max_in_flight"] or status["deployment"]["max_in_flight"]
    if not cap or settings is None:
        return None, "no C yet: no worker has started"
    model = DurationModel(admission.redis, settings.expected_generation_s)
    generation_s = model.expected_s(DEFAULT_MODEL, DEFAULT_RESOLUTION)
    return (round(pause_s + math.ceil(left / cap) * generation_s),
            "estimated from C and generation time" + after)


def top_reasons(found: list[Failure], limit: int = TOP_REASONS) -> dict:
    """Failures grouped by reason (numbers and the job's id folded, so "after
    86412 s" and "after 86417 s" are one reason), the most common first."""
    grouped = Counter(reason_group(_without_id(failure.reason, failure.job_id))
                      for failure in found)
    return {"count": len(found),
            "top_reasons": [{"reason": reason, "count": count}
                            for reason, count in grouped.most_common(limit)]}


def _without_id(reason: str, job_id: str) -> str:
    """A job's own id in its storage key or path (after a '/'): it must not make
    each reason unique, nor id "8" eat the 8 of "8 attempts"."""
    if not job_id:
        return reason
    return re.sub(rf"(?<=/){re.escape(job_id)}(?![\w-])", "<job>", reason)


def reason_group(reason: str) -> str:
    # Standalone numbers only: "wan2.1-t2v" is a name, not a count.
    folded = re.sub(r"(?<![\w.])\d+(\.\d+)?(?![A-Za-z])", "N",
                    reason.strip() or "(no reason recorded)")
    return folded if len(folded) <= 200 else folded[:199] + "…"


def workers_alive(client) -> int:
    """Workers running steps (not only webhook deliveries, not stopping)
    whose heartbeat key is alive, among the names seen in the last hour
    (O(workers), no keyspace scan)."""
    seconds, _ = client.time()
    names = client.zrangebyscore(keys.WORKERS, seconds - 3600, "+inf")
    if not names:
        return 0
    beats = client.mget([keys.worker_alive(name) for name in names])
    return sum(1 for alive in beats if alive and alive not in keys.NOT_TAKING_STEPS)
