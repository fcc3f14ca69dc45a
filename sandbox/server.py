"""Running the sandbox: in a background thread (tests, benchmarks) or blocking (CLI)."""

from __future__ import annotations

import signal
import socket
import threading
from http.server import ThreadingHTTPServer

from sandbox.config import SandboxConfig
from sandbox.http_handler import SandboxRequestHandler
from sandbox.state import SandboxState
from sandbox.videos import DEFAULT_SHAPE, VideoCache, frame_size

WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def _url_host(host: str) -> str:
    if host in WILDCARD_HOSTS:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class SandboxHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # never wait for open keep-alive connections on shutdown
    request_queue_size = 256  # benchmarks open many connections at once

    def __init__(self, config: SandboxConfig, state: SandboxState):
        self.config, self.state = config, state
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), SandboxRequestHandler)

    @property
    def url(self) -> str:
        return f"http://{_url_host(self.config.host)}:{self.server_address[1]}"

    def file_base_url(self, host_header: str | None) -> str:
        # Bound to every interface, the only name known to work is the one the
        # client used to reach us (e.g. from inside a container).
        if self.config.host in WILDCARD_HOSTS and host_header:
            return f"http://{host_header}"
        return self.url


class SandboxServer:
    """A local stand-in for the AI/ML API video endpoints.

    with SandboxServer(SandboxConfig(time_scale=90)) as srv:
        requests.post(f"{srv.url}/v2/video/generations", ...)
    """

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        self.videos = VideoCache(self.config.resolved_cache_dir(), self.config.pad_video_to)
        self.state = SandboxState(self.config, self.videos)
        self._httpd: SandboxHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> SandboxServer:
        """Bind and serve in a daemon thread; returns once the port is open."""
        if self._httpd is not None:
            return self
        self._httpd = SandboxHTTPServer(self.config, self.state)
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name=f"sandbox-{self._httpd.server_address[1]}",
                                        daemon=True)
        self._thread.start()
        # The most common shape renders in the background, off the request path.
        self.videos.prepare_async(*frame_size(*DEFAULT_SHAPE))
        return self

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("SandboxServer is not started")
        return self._httpd.url

    def stats(self) -> dict:
        return self.state.stats()

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


class CannotListen(Exception):
    """`vidq sandbox` cannot bind its address."""


def serve_forever(config: SandboxConfig | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM (the `vidq sandbox` command)."""
    config = config or SandboxConfig()
    stop_requested = threading.Event()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = None
    if in_main_thread:
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    server = SandboxServer(config)
    try:
        server.start()
    except OSError as exc:  # the port in use, a host that does not resolve
        raise CannotListen(f"cannot listen on {config.host}:{config.port}: "
                           f"{exc.strerror or exc}") from None
    print(f"sandbox listening on {server.url} (api key: {config.api_key})", flush=True)
    try:
        while not stop_requested.wait(0.5):  # short waits keep Ctrl-C responsive
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
