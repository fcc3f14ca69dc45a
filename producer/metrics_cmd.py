"""`vidq metrics --port N`: serve the deployment's Prometheus metrics.

The figures come from Redis at each scrape (`worker.metrics_collector`), so
the exporter holds no state and may run anywhere that reaches Redis; run one
per deployment.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, start_http_server

from worker.connection import connect
from worker.errors import InputError
from worker.metrics_collector import VidqCollector
from worker.settings import Settings

DEFAULT_PORT = 9808


def registry_for(settings: Settings) -> CollectorRegistry:
    """A registry with vidq's collector only (no process metrics of the exporter)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(VidqCollector(connect(settings.redis_url), settings.heartbeat_ttl_s))
    return registry


def serve_metrics(settings: Settings, host: str, port: int,
                  echo: Callable[[str], None] = print) -> None:
    """Serve /metrics until SIGINT or SIGTERM; Redis must answer first."""
    registry = registry_for(settings)
    connect(settings.redis_url).ping()  # an unreachable Redis is one error line, now
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise InputError(f"--port {port}: cannot listen on {host}:{port}: "
                         f"{exc.strerror or exc}") from None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    echo(f"serving vidq metrics at http://{host}:{server.server_port}/metrics")
    stop.wait()
    server.shutdown()
    thread.join(timeout=5)
