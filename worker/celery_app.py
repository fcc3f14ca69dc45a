"""The Celery application. Importing it reads no setting: the configuration
is applied when Celery first needs it (a worker starting), or explicitly by a
producer with `apply_settings`.

Start a worker with `celery -A worker worker -Q vidq.submit,vidq.poll,vidq.download,vidq.webhook`
(every queue in QUEUES), or one pool per queue.
"""
from __future__ import annotations

# Imported now, before any thread or pool child exists: datetime.strptime
# imports it on first use (botocore calls it on every S3 answer), and a pool
# child forked while a thread of the worker's main process (the start-up
# storage check) held that import's lock inherited the lock held, and hung
# for good in its first S3 call.
import _strptime  # noqa: F401

from celery import Celery
from kombu import Exchange, Queue

from . import kombu_fix, prefetch_fix
from .errors import ConfigError
from .redis_url import (
    broker_tls_verified,
    is_sentinel_url,
    sentinel_master_of,
    without_master_name,
)
from .settings import Settings

# Webhook deliveries have their own queue, so a slow receiver never holds up a step.
WEBHOOK_QUEUE = "vidq.webhook"
# Every queue a task is routed to: a deployment's workers must consume them all
# (`vidq run`, the tests, the benchmarks; compose and Kubernetes, one pool each).
QUEUES = ("vidq.submit", "vidq.poll", "vidq.download", WEBHOOK_QUEUE)
EXCHANGE = Exchange("vidq", type="direct")
# One task per step, each with the name of the queue it runs on.
TASK_FOR_STEP = {"submit": "vidq.submit", "poll": "vidq.poll", "download": "vidq.download"}

app = Celery("vidq", include=["worker.tasks", "worker.lifecycle", "worker.webhook_tasks"])
kombu_fix.install(app)
prefetch_fix.install()


@app.on_configure.connect
def _configure_from_env(sender: Celery, **_kwargs) -> None:
    if getattr(sender, "vidq_settings", None) is None:
        try:
            apply_settings(sender, Settings.from_env())
        except ConfigError as exc:
            # Celery's signal swallows it: kept for settings_of to raise, so a
            # worker with a bad setting says which, not "no attribute".
            sender.vidq_config_error = exc  # type: ignore[attr-defined]


def settings_of(celery_app: Celery) -> Settings:
    _ = celery_app.conf.broker_url  # configures the app if nothing did yet
    settings = getattr(celery_app, "vidq_settings", None)
    if settings is None:
        raise getattr(celery_app, "vidq_config_error", None) or ConfigError(
            "vidq settings were never applied")
    return settings


def apply_settings(celery_app: Celery, settings: Settings) -> None:
    """Configure the app from settings; also used to point a producer elsewhere."""
    previous = getattr(celery_app, "vidq_settings", None)
    celery_app.vidq_settings = settings  # type: ignore[attr-defined]
    if previous is not None and previous.redis_url != settings.redis_url:
        # Pooled broker connections and producers keep their old URL: drop
        # them, or messages would still go to the previous Redis.
        celery_app._pool = None
        if "amqp" in celery_app.__dict__:
            celery_app.amqp._producer_pool = None
    transport_options: dict = {
        "visibility_timeout": settings.visibility_timeout_s,
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
    }
    broker_url = broker_tls_verified(settings.redis_url)
    # A publish during a Redis blip or a Sentinel failover waits for Redis
    # (~20 s at most) instead of failing: a submit published just after the
    # pump took its slot was otherwise re-sent only a step grace later (90 s
    # by default), its slot idle meanwhile (review 81; Celery's default
    # policy gave up after 0.6 s).
    publish_retry = {"max_retries": 12, "interval_start": 0.2, "interval_step": 0.5,
                     "interval_max": 2.0}
    if is_sentinel_url(broker_url):
        # kombu's SentinelChannel takes the master's name as a transport option;
        # a dead master's half-open socket must time out, not hang a publish.
        broker_url = without_master_name(broker_url)
        transport_options.update(master_name=sentinel_master_of(settings.redis_url),
                                 socket_connect_timeout=5, socket_timeout=30,
                                 sentinel_kwargs={"socket_connect_timeout": 1,
                                                  "socket_timeout": 2})
    celery_app.conf.update(
        broker_url=broker_url,
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
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # No result backend: job state lives in the job records.
        task_ignore_result=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        # Countdown polls sit in worker memory: let a warm shutdown hand them
        # back to Redis instead of dropping them when the worker looks idle.
        worker_soft_shutdown_timeout=10.0,
        worker_enable_soft_shutdown_on_idle=True,
        worker_hijack_root_logger=False,
        task_publish_retry_policy=publish_retry,
    )
