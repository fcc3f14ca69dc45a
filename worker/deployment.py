"""The settings every worker of one deployment must share, compared.

Workers started from different shells (a rolling upgrade, a forgotten
terminal) used to run side by side on their own values with nothing said:
C flipped with each restart and passed an operator's `vidq cap`, videos
split across two storage roots, one worker POSTed to another upstream, a
short hard limit gave up paid generations the others would have waited for.
Each starting worker now records its values under its name
(`vidq:worker_settings`); the live workers' disagreements are logged as
errors when one starts and shown by `vidq status`. C itself is the lowest
of the live workers' values: never above any of them.
"""
from __future__ import annotations

import contextlib
import json
import logging

import redis

from . import keys
from .errors import ConfigError
from .netguard import redacted, without_credentials
from .pacing import lowest_rate
from .rows import storage_base
from .settings import Settings
from .spend import CreditEstimates, parse_estimates

log = logging.getLogger(__name__)
# Celery runs a countdown on the receiving worker's clock, set by the sender's.
# Each poll a worker sends runs late (or early) by its clock's difference to the
# receiving worker's, its slot idle meanwhile: 4 s off was 7x the idle
# slot-seconds of clocks in step (review 93), and went unsaid at 5 s.
CLOCK_SKEW_WARN_S = 1.0
# A worker not heard from this long is gone (far more than a heartbeat TTL).
GONE_AFTER_S = 60.0

# What must agree, by the variable that sets it.
SHARED = {
    "VIDQ_MAX_IN_FLIGHT": lambda s: s.max_in_flight,
    "VIDQ_MAX_SUBMITS_PER_S": lambda s: s.max_submits_per_s,
    "VIDQ_STORAGE_URL": lambda s: storage_base(s.storage_url),
    # Without a gateway's credentials or token: a rotation is no disagreement,
    # and this is shown in logs and `vidq status`.
    "AIMLAPI_BASE_URL": lambda s: redacted(without_credentials(s.base_url)).rstrip("/"),
    "VIDQ_ENDPOINT": lambda s: s.endpoint,
    "VIDQ_DEADLINE_S": lambda s: s.deadline_s,
    "VIDQ_HARD_LIMIT_S": lambda s: s.hard_limit_s,
    "VIDQ_RETENTION_S": lambda s: s.retention_s,
    "VIDQ_CREDIT_ESTIMATE": lambda s: s.credit_estimate,
    "VIDQ_CREDIT_ESTIMATES": lambda s: s.credit_estimates,
}


# A worker consuming vidq.webhook says whether it can sign (never the secret):
# without VIDQ_WEBHOOK_SECRET each delivery it takes fails "not sent", found
# in the morning; `vidq enqueue --webhook` refuses while one of them cannot.
SIGNS_WEBHOOKS = "signs_webhooks"


def record(settings: Settings, delivers_webhooks: bool = False) -> str:
    """What a worker writes at start and with every heartbeat."""
    values: dict = {name: read(settings) for name, read in SHARED.items()}
    if delivers_webhooks:
        values[SIGNS_WEBHOOKS] = bool(settings.webhook_secret)
    return json.dumps(values)


def check_webhook_deliverers(values: dict[str, dict], option: str) -> str:
    """Before a batch gets a webhook URL: ConfigError if a live worker consuming
    vidq.webhook cannot sign; a warning ('' if none) if no such worker is live."""
    unsigned = sorted(w for w, theirs in values.items() if theirs.get(SIGNS_WEBHOOKS) is False)
    if unsigned:
        raise ConfigError(
            f"{option}: the live worker(s) {', '.join(unsigned)} consume vidq.webhook without "
            "VIDQ_WEBHOOK_SECRET, so every delivery they take would fail \"not sent\"; start "
            "them with it (README: Events and webhooks), then enqueue again")
    if not any(theirs.get(SIGNS_WEBHOOKS) for theirs in values.values()):
        return (f"warning: {option}: no live worker consumes vidq.webhook; deliveries wait "
                "for one started with VIDQ_WEBHOOK_SECRET")
    return ""


def live_values(client: redis.Redis, worker: str = "", prune: bool = False) -> dict[str, dict]:
    """The shared values of each worker heard from within GONE_AFTER_S
    (`worker`, starting, counts). A worker frozen for a few heartbeats (a VM
    paused, a swap storm) still counts, so C is not raised above its value
    meanwhile. With `prune`, older records are dropped."""
    recorded = client.hgetall(keys.WORKER_SETTINGS)
    seconds, _ = client.time()
    recent = {str(name) for name in client.zrangebyscore(keys.WORKERS, seconds - GONE_AFTER_S,
                                                         "+inf")}
    gone = {str(name) for name in recorded if name not in recent and name != worker}
    if gone and prune:
        client.hdel(keys.WORKER_SETTINGS, *gone)
    found = {}
    for name, value in recorded.items():
        if name in gone:
            continue
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            found[str(name)] = parsed
        else:  # another version's or a foreign writer's: never in C's way
            log.warning("worker settings record of %s is not a JSON object: ignored", name)
    return found


def running_values(client: redis.Redis, values: dict[str, dict] | None = None,
                   starting: str = "") -> dict[str, dict]:
    """Of the live values (`values`, else read), those of the workers running
    now (and the `starting` one, not beating yet): a stopping worker says so
    in its heartbeat, then drops it, but keeps its record a minute (so C
    cannot rise over an operator's cap meanwhile); its values are no
    disagreement with the workers that replaced it."""
    values = live_values(client) if values is None else values
    pipe = client.pipeline(transaction=False)
    for name in values:
        pipe.get(keys.worker_alive(name))
    return {name: theirs for (name, theirs), beat in zip(values.items(), pipe.execute(),
                                                         strict=True)
            if name == starting or (beat and beat != keys.STOPPING_WORKER)}


def disagreements(values: dict[str, dict]) -> list[str]:
    """'VIDQ_MAX_IN_FLIGHT: 3 (a/1), 2 (b/2)' for each setting the live workers disagree on."""
    found = []
    for name in SHARED:
        seen: dict[str, list[str]] = {}
        for worker, theirs in sorted(values.items()):
            seen.setdefault(json.dumps(theirs.get(name)), []).append(worker)
        if len(seen) > 1:
            found.append(f"{name}: " + ", ".join(f"{json.loads(value)} ({', '.join(workers)})"
                                                  for value, workers in seen.items()))
    return found


def lowest_cap(values: dict[str, dict], own: int) -> int:
    caps = [int(theirs["VIDQ_MAX_IN_FLIGHT"]) for theirs in values.values()
            if isinstance(theirs.get("VIDQ_MAX_IN_FLIGHT"), int)]
    return min([own, *caps])


def lowest_submit_rate(values: dict[str, dict], own: float) -> float:
    """The lowest VIDQ_MAX_SUBMITS_PER_S of the live workers that set one (0: none)."""
    rates = [float(theirs["VIDQ_MAX_SUBMITS_PER_S"]) for theirs in values.values()
             if isinstance(theirs.get("VIDQ_MAX_SUBMITS_PER_S"), int | float)]
    return lowest_rate([own, *rates])


def note_clock_skew(skew_s: float, was_off: bool) -> bool:
    """This machine's clock against Redis's (`skew_s`, local minus Redis;
    leases, spend days and retention use Redis's; Celery's countdowns use each
    worker's own): a worker an hour off sends its polls an hour late or early,
    and the reconciler re-sends them after the step grace. Checked with every
    heartbeat, so a clock that jumps mid-night (an NTP step, a VM moved) is
    told too; said once each way. Returns whether it is off now."""
    off = abs(skew_s) > CLOCK_SKEW_WARN_S
    if off and not was_off:
        log.error("this machine's clock is %+.0f s off Redis's: countdown polls run on each "
                  "worker's clock, so they come late or early and are re-sent; sync the "
                  "clocks (NTP)", skew_s)
    elif was_off and not off:
        log.warning("this machine's clock agrees with Redis's again (%+.1f s)", skew_s)
    return off


def highest_estimates(values: dict[str, dict], own: CreditEstimates) -> CreditEstimates:
    """The highest credit estimate any live worker has, per shape: the spend
    caps count what the most careful of them would."""
    workers = [own]
    for theirs in values.values():
        with contextlib.suppress(KeyError, TypeError, ValueError, ConfigError):
            workers.append(CreditEstimates(float(theirs["VIDQ_CREDIT_ESTIMATE"]),
                                           parse_estimates(str(theirs["VIDQ_CREDIT_ESTIMATES"]))))
    shapes = {shape for each in workers for shape in each.table}
    # A worker without a shape in its table counts it at its default.
    return CreditEstimates(max(each.default for each in workers),
                           {shape: max(each.table.get(shape, each.default) for each in workers)
                            for shape in shapes})
