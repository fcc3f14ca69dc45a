"""What a worker does besides running tasks: it says it is alive, tells
Redis its C, records which job messages it holds, and reconciles.

The heartbeat key lives 3 heartbeats; the jobs whose messages (countdown
polls included) a worker holds name it as `holder`, so when it dies its jobs
are re-sent by the next reconciler pass, not after a long grace period.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

import redis
from celery import bootsteps
from celery.signals import celeryd_init, task_received, worker_shutting_down

from . import deployment, keys, manifest
from .admission import admit
from .celery_app import QUEUES, WEBHOOK_QUEUE, app, settings_of
from .connection import take_lock
from .draining import beat_until_exit
from .errors import ConfigError, StorageError
from .paid_journal import REPLAY_EVERY_S, check_directory, replay_now
from .purged_looks import look_at_purged_generations
from .recovery import reconcile
from .retention import housekeeping
from .settings import eta_task_limit
from .tasks import WORKER_ID, dispatch, get_steps, worker_id
from .upstream import UpstreamClient
from .webhook_tasks import send_delivery
from .webhooks import relay

log = logging.getLogger(__name__)
WORKER_NAMES_KEPT_S = 86400
REPLAY_AT_START_S = 10.0


def alive_as(consumed) -> str:
    """What this worker's heartbeat says it runs (keys.STEPS_WORKER, keys.WEBHOOK_WORKER)."""
    return keys.STEPS_WORKER if set(consumed or QUEUES) - {WEBHOOK_QUEUE} else keys.WEBHOOK_WORKER


def webhooks_consumed(consumed) -> bool:
    return WEBHOOK_QUEUE in set(consumed or QUEUES)


def check_storage(storage) -> None:
    """Say at start, not after the first paid video, that storage is not
    usable: a mistyped bucket or a wrong key. Not a refusal: a bucket may
    come later, and until then downloads are retried (VIDQ_HARD_LIMIT_S)."""
    try:
        storage.check()
    except StorageError as exc:
        log.error("storage is not usable now: %s. Videos will be paid for and wait for it "
                  "(downloads are retried until VIDQ_HARD_LIMIT_S); fix VIDQ_STORAGE_URL or "
                  "its credentials, or pause its batches (`vidq pause NAME`)", exc)


class Lifecycle(bootsteps.StartStopStep):
    """Heartbeat, C, and the reconciler, on the worker's timer."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self.timers: list = []
        self.record = ""
        self.alive_as = keys.STEPS_WORKER
        self.housekeeper: threading.Thread | None = None
        self.replayer: threading.Thread | None = None
        self.looker: threading.Thread | None = None
        self.clock_off = False
        self.worker = worker
        self.holds_webhooks = False
        # The random part: two workers named alike (one hostname, both PID 1
        # in their containers) must not share a record or a holder name.
        WORKER_ID["name"] = self.hostname = (f"{worker.hostname}/{os.getpid()}/"
                                             f"{os.urandom(2).hex()}")

    def start(self, worker):
        steps = get_steps()  # fail at start-up, not on the first task
        settings = steps.settings
        client = steps.store.redis
        self.alive_as = alive_as(worker.app.amqp.queues.consume_from)
        self.holds_webhooks = webhooks_consumed(worker.app.amqp.queues.consume_from)
        # re-written with every heartbeat
        self.record = deployment.record(settings, self.holds_webhooks)
        if self.holds_webhooks:  # before the consumer reads it, where it starts after this
            worker.app.conf.worker_eta_task_limit = None
            if settings.webhook_url and not settings.webhook_secret:
                log.error("VIDQ_WEBHOOK_URL is set and this worker consumes vidq.webhook, but "
                          "it has no VIDQ_WEBHOOK_SECRET: every delivery it takes fails "
                          "\"not sent\" (`vidq webhooks NAME --replay` once it has one)")
        client.hset(keys.WORKER_SETTINGS, self.hostname, self.record)
        live = deployment.live_values(client, self.hostname, prune=True)
        # Not with the workers this one replaced (a restart with a new value):
        # they still count for C for a minute, but no longer run.
        running = deployment.running_values(client, live, starting=self.hostname)
        for disagreement in deployment.disagreements(running):
            log.error("the live workers disagree on %s: start them all with one value "
                      "(`vidq status` shows this too)", disagreement)
        self.set_cap(steps, deployment.lowest_cap(live, settings.max_in_flight))
        self.publish_submit_rate(client, deployment.lowest_submit_rate(
            live, settings.max_submits_per_s))
        steps.admission.publish_estimates(
            deployment.highest_estimates(live, steps.admission.credits))
        manifest.publish_storage_url(client, settings.storage_url)
        # In a thread: an endpoint that never answers must not hold the start.
        threading.Thread(target=check_storage, args=(steps.storage,), name="storage check",
                         daemon=True).start()
        try:
            check_directory(Path(settings.journal_dir))
        except OSError as exc:
            log.error("the paid-id journal VIDQ_JOURNAL_DIR=%s is not usable (%s): a worker "
                      "stopped while Redis is away loses the ids it holds", settings.journal_dir,
                      exc)
        # Before the first heartbeat: `vidq run` resuming a batch watches it
        # once a worker beats, and must not read a job as failed "outcome
        # unknown" whose paid id is in the journal.
        self.replay_journal(wait_s=REPLAY_AT_START_S)
        self.beat()
        worker_shutting_down.connect(self.shutting_down)
        self.timers = [
            worker.timer.call_repeatedly(settings.heartbeat_interval_s, self.beat),
            worker.timer.call_repeatedly(settings.reconcile_interval_s, self.reconcile),
            worker.timer.call_repeatedly(REPLAY_EVERY_S, self.replay_journal),
        ]

    @staticmethod
    def set_cap(steps, cap: int) -> None:
        old, kept = steps.admission.set_cap(cap)
        if kept and old != cap:
            log.warning("C = %s, set with `vidq cap`, stands (the workers' VIDQ_MAX_IN_FLIGHT "
                        "is %s, the value it overrode)", old, cap)
        elif old not in (None, cap):
            log.warning("C (VIDQ_MAX_IN_FLIGHT, the lowest of the live workers') changed from "
                        "%s to %s for the deployment", old, cap)

    @staticmethod
    def publish_submit_rate(client, rate: float) -> None:
        """POSTs go at the lowest VIDQ_MAX_SUBMITS_PER_S of the live workers
        (worker/pacing.py), followed as C is."""
        old = client.hget(keys.CONFIG, "submit_rate")
        client.hset(keys.CONFIG, "submit_rate", repr(rate))
        if old not in (None, repr(rate)):
            log.warning("POSTs per second (VIDQ_MAX_SUBMITS_PER_S, the lowest of the live "
                        "workers'; 0: unpaced) changed from %s to %s for the deployment",
                        old, rate)

    def follow_cap(self, steps) -> None:
        """C is the lowest VIDQ_MAX_IN_FLIGHT of the live workers: once the
        last worker of an old value is gone (a rolling upgrade; a worker
        counts until GONE_AFTER_S after its last beat, stopped or not), C follows, as
        when a worker starts: an operator's `vidq cap` stands until that
        deployment value changes. A worker frozen for a few heartbeats still
        counts, so C never rises above its value meanwhile."""
        client = steps.store.redis
        live = deployment.live_values(client, self.hostname)
        cap = deployment.lowest_cap(live, steps.settings.max_in_flight)
        if client.hget(keys.CONFIG, "deployment_cap") != str(cap):
            self.set_cap(steps, cap)
        rate = deployment.lowest_submit_rate(live, steps.settings.max_submits_per_s)
        if client.hget(keys.CONFIG, "submit_rate") != repr(rate):
            self.publish_submit_rate(client, rate)
        # Also what a flushed or rewritten config lost, and what departed workers left.
        estimates = deployment.highest_estimates(live, steps.admission.credits)
        if client.hget(keys.CONFIG, "credit_estimate") != repr(estimates.default):
            steps.admission.publish_estimates(estimates)
        if not client.hexists(keys.CONFIG, "storage_url"):
            manifest.publish_storage_url(client, steps.settings.storage_url)

    def shutting_down(self, **_kwargs) -> None:
        """A warm shutdown began (SIGTERM): the pool finishes the steps it
        runs, but the countdown polls this worker holds will not run here.
        The next heartbeat says so, and the reconciler sends them again at
        once (recovery.lost_steps), not when the pool is done and the worker
        exits (a download's minutes, its slots idle). No Redis call here: this
        runs in the signal handler."""
        self.alive_as = keys.STOPPING_WORKER

    def stop(self, worker):
        for timer in self.timers:
            timer.cancel()
        # Its settings record stays until GONE_AFTER_S: a worker restarted
        # with the same value must not let C rise meanwhile, over an
        # operator's cap. Its heartbeat says "stopping" until it exits: its
        # held polls are re-sent, the steps its pool still runs are not.
        steps = get_steps()
        beat_until_exit(steps.store.redis, self.hostname, steps.settings.heartbeat_ttl_s,
                        steps.settings.heartbeat_interval_s)

    def beat(self) -> None:
        steps = get_steps()
        client = steps.store.redis
        try:
            seconds, micros = client.time()
            self.clock_off = deployment.note_clock_skew(
                time.time() - (seconds + micros / 1e6), self.clock_off)
            pipe = client.pipeline(transaction=False)
            pipe.set(keys.worker_alive(self.hostname), self.alive_as,
                     px=int(steps.settings.heartbeat_ttl_s * 1000))
            # The names seen lately, so `vidq status` finds the live ones
            # without scanning the keyspace; a name silent for a day is dropped.
            pipe.zadd(keys.WORKERS, {self.hostname: seconds})
            # Again and again: a record pruned while this worker was frozen comes back.
            pipe.hset(keys.WORKER_SETTINGS, self.hostname, self.record)
            pipe.zremrangebyscore(keys.WORKERS, "-inf", seconds - WORKER_NAMES_KEPT_S)
            pipe.hget(keys.CONFIG, "max_in_flight")
            self.follow_eta_limit(pipe.execute()[-1], steps.settings)
        except redis.RedisError as exc:
            log.warning("heartbeat skipped: %s", exc)

    def follow_eta_limit(self, cap: str | None, settings) -> None:
        """The countdown messages this worker may hold follow C as it is now:
        set at start from its own VIDQ_MAX_IN_FLIGHT, a `vidq cap` above it
        left due polls waiting in the queue while slots sat idle (review 93:
        174 idle slot-seconds against 53 at C = 30)."""
        qos = getattr(getattr(self.worker, "consumer", None), "qos", None)
        if qos is not None and self.holds_webhooks:
            # A delivery awaiting its retry is a countdown too, one per video
            # while the receiver is down: no size fits, and once they fill the
            # limit this worker fetches nothing, polls included (review 97:
            # both slots taken, 0 generations upstream for minutes).
            qos.max_prefetch = None
            return
        if qos is None or cap is None or not cap.isdigit():
            return
        # Raised, never lowered: below the countdowns already held, the worker
        # fetches nothing until they run (review 95: after C went from 40 to 4,
        # one submit at a time on a -c 4 worker; worker/prefetch_fix.py).
        limit = max(qos.max_prefetch or 0, settings.worker_eta_task_limit,
                    eta_task_limit(int(cap)))
        if qos.max_prefetch != limit:
            log.info("countdown messages held: up to %d (C = %s)", limit, cap)
            qos.max_prefetch = limit

    def keep_house(self, steps) -> None:
        """Manifests and retention, in a thread of their own: writing a big
        manifest takes seconds, and the timer thread must keep beating or this
        worker would look dead and its jobs be re-sent."""
        if self.housekeeper is not None and self.housekeeper.is_alive():
            return

        def run() -> None:
            try:
                housekeeping(steps.store.redis, steps.storage, steps.settings)
            except redis.RedisError as exc:
                log.warning("housekeeping skipped: %s", exc)

        self.housekeeper = threading.Thread(target=run, name="vidq housekeeping", daemon=True)
        self.housekeeper.start()

    def replay_journal(self, wait_s: float = 0.0) -> None:
        """Paid ids a process died holding before Redis had them
        (worker/paid_journal.py), in a thread: a Redis stall must not hold
        the timer (the heartbeat) for longer than `wait_s`."""
        if self.replayer is not None and self.replayer.is_alive():
            return
        steps = get_steps()
        self.replayer = threading.Thread(
            target=replay_now, args=(Path(steps.settings.journal_dir), steps.store,
                                     steps.durability), name="vidq journal replay", daemon=True)
        self.replayer.start()
        self.replayer.join(wait_s)

    def look_at_purged(self, steps) -> None:
        """In a thread: a status GET must not hold the timer (the heartbeat)."""
        if self.looker is None or not self.looker.is_alive():
            self.looker = threading.Thread(
                target=look_at_purged_generations,
                args=(steps.admission, steps.client.fetch, steps.store.pause_polls,
                      lambda: admit(steps.admission, dispatch), steps.settings.backoff_cap_s),
                name="vidq purged looks", daemon=True)
            self.looker.start()

    def reconcile(self) -> None:
        steps = get_steps()
        settings = steps.settings
        token = f"{self.hostname}:{os.urandom(4).hex()}"
        try:
            if not take_lock(steps.store.redis, keys.RECONCILE_LOCK, token,
                             0.9 * settings.reconcile_interval_s):
                return
            try:
                self.follow_cap(steps)
            except (ValueError, TypeError, KeyError) as exc:  # never in the re-sends' way
                log.error("C not followed: %s", exc)
            resent = reconcile(steps.admission, dispatch, settings.step_grace_s)
            if resent:
                log.warning("reconciler re-sent %d lost steps", resent)
            self.look_at_purged(steps)
            self.keep_house(steps)
            relay(steps.store.redis, settings, send_delivery)  # events -> webhook deliveries
        except redis.RedisError as exc:
            log.warning("reconcile skipped: %s", exc)


@celeryd_init.connect
def _refuse_bad_settings(**_kwargs) -> None:
    """A worker with a bad setting (or no API key) says which in one line and
    exits 2, before Celery's banner: the banner showed Celery's default
    `amqp://` transport, as if that were the problem, and a traceback came
    before the real cause (helper 107)."""
    try:
        UpstreamClient(settings_of(app))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


@task_received.connect
def _note_holder(request=None, **_kwargs) -> None:
    """A message sits in this worker's memory until it runs (a countdown poll
    until it is due): the job records that this worker holds it, so its
    death is noticed at once."""
    if request is None:
        return
    try:
        ref, token = request.args[:2]
        get_steps().store.set_holder(ref, token, worker_id())
    except (redis.RedisError, ValueError, TypeError) as exc:
        log.warning("could not record the holder of %s: %s", request.id, exc)


app.steps["worker"].add(Lifecycle)
