"""Test instrumentation (tests/test_redis_stalls.py): a worker process on
whose PYTHONPATH this directory is stops itself (SIGSTOP) while a POST
thread connects to the upstream, once, when `$VIDQ_TEST_FREEZE_DIR/armed`
exists: where a suspend lands between the POST's last check and its first
byte (on the real API, during the TLS handshake). Nothing else changes."""
import os
import signal
import socket
import threading

_DIR = os.environ.get("VIDQ_TEST_FREEZE_DIR")
_PORT = int(os.environ.get("VIDQ_TEST_FREEZE_PORT", "0"))

if _DIR:
    _connect = socket.socket.connect

    def connect(self, address):  # type: ignore[no-untyped-def]
        if (threading.current_thread().name.startswith("post ")
                and isinstance(address, tuple) and address[1] == _PORT):
            try:
                os.remove(os.path.join(_DIR, "armed"))
            except FileNotFoundError:
                return _connect(self, address)
            with open(os.path.join(_DIR, "stopped"), "w") as mark:
                mark.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)
        return _connect(self, address)

    socket.socket.connect = connect
