"""The Celery application, configured from `Settings` and nothing else.

Start a worker with `celery -A worker worker -Q vidq.submit,vidq.poll,vidq.download`.
"""
from __future__ import annotations

import logging

from celery import Celery, bootsteps
from kombu import Exchange, Queue

from .settings import Settings

log = logging.getLogger(__name__)

QUEUES = ("vidq.submit", "vidq.poll", "vidq.download")
EXCHANGE = Exchange("vidq", type="direct")
# One task per step, each with the name of the queue it runs on.
TASK_FOR_STEP = {"submit": "vidq.submit", "poll": "vidq.poll", "download": "vidq.download"}


def create_app(settings: Settings) -> Celery:
    app = Celery("vidq")
    apply_settings(app, settings)
    app.steps["worker"].add(Reconciler)
    return app


def apply_settings(app: Celery, settings: Settings) -> None:
    """Configure `app` from settings; also used to point a producer elsewhere."""
    app.conf.update(
        broker_url=settings.redis_url,
        task_queues=[Queue(name, EXCHANGE, routing_key=name) for name in QUEUES],
        task_default_exchange=EXCHANGE.name,
        task_default_queue="vidq.submit",
        task_routes={name: {"queue": name, "exchange": EXCHANGE.name, "routing_key": name}
                     for name in QUEUES},
        task_serializer="json",
        accept_content=["json"],
        # Every step is idempotent on its job record, so a redelivery is safe
        # and a lost worker's tasks come back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_eta_task_limit=settings.worker_eta_task_limit,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        # No result backend: job state lives in the job records.
        task_ignore_result=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        # Countdown polls sit in worker memory: let a warm shutdown hand them
        # back to Redis instead of dropping them when the worker looks idle.
        worker_soft_shutdown_timeout=10.0,
        worker_enable_soft_shutdown_on_idle=True,
        worker_hijack_root_logger=False,
    )
    app.vidq_settings = settings


class Reconciler(bootsteps.StartStopStep):
    """Every few seconds, one worker re-sends lost steps and fills free slots."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self.timer_ref = None

    def start(self, worker):
        from .tasks import get_steps, reconcile_once

        get_steps()  # fail at start-up, not on the first task, if misconfigured

        interval = worker.app.vidq_settings.reconcile_interval_s
        self.timer_ref = worker.timer.call_repeatedly(interval, reconcile_once)

    def stop(self, worker):
        if self.timer_ref is not None:
            self.timer_ref.cancel()
