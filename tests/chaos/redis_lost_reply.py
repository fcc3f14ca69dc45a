"""A TCP proxy in front of a real Redis that loses one reply.

Armed with a byte pattern, it forwards the next request that contains it,
waits for Redis to answer (so the command has run), runs the arm's `then`
(what else happened meanwhile: another worker's step, a restart's empty
script cache), then resets the client's connection instead of passing the
answer on. The client sees what a network
drop or a Redis restart after the command leaves it with: a ConnectionError
for a call that did happen. redis-py then reconnects and sends it again.
`after_reply` loses nothing: it runs its `then` once Redis has answered a
command, just before passing the answer on (to freeze the client, or cut it
off, at exactly that point).
`down_for` makes Redis unreachable through the proxy for a while (a restart
loading a big AOF): every request, on any connection, is reset unsent.
"""
from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable


class LostReplyProxy:
    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.lost = 0
        self._pattern: bytes | None = None
        self._then: Callable[[], object] | None = None
        self._after: tuple[bytes, Callable[[], object]] | None = None
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, pattern: bytes, then: Callable[[], object] | None = None) -> None:
        """Lose the reply to the next request that contains `pattern`, after
        running `then` (before the client can send it again)."""
        with self._lock:
            self._pattern, self._then = pattern, then

    def after_reply(self, pattern: bytes, then: Callable[[], object]) -> None:
        """Run `then` once Redis answered the next request that contains
        `pattern`, just before its reply is passed on (nothing lost): e.g.
        freeze the client right after Redis ran it."""
        with self._lock:
            self._after = (pattern, then)

    def down_for(self, seconds: float) -> None:
        """Reset every request for `seconds`, unsent: Redis unreachable."""
        with self._lock:
            self._down_until = time.monotonic() + seconds

    def _is_down(self) -> bool:
        with self._lock:
            return time.monotonic() < self._down_until

    def _take_after(self, data: bytes) -> Callable[[], object] | None:
        with self._lock:
            if self._after is None or self._after[0] not in data:
                return None
            then, self._after = self._after[1], None
            return then

    def _take(self, data: bytes) -> bool:
        with self._lock:
            hit = self._pattern is not None and self._pattern in data
            if hit:
                self._pattern, self.lost = None, self.lost + 1
            return hit

    def _accept(self) -> None:
        while True:
            client, _ = self._server.accept()
            upstream = socket.create_connection(self.target)
            cut, answered = threading.Event(), threading.Event()
            pending: list = []  # a `then` to run after the next reply passed on
            threading.Thread(target=self._down, args=(client, upstream, cut, answered, pending),
                             daemon=True).start()
            threading.Thread(target=self._up, args=(client, upstream, cut, answered, pending),
                             daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, cut: threading.Event,
            answered: threading.Event, pending: list) -> None:
        """Client to Redis; on a hit, forward, wait for Redis's answer, reset."""
        try:
            while data := client.recv(1 << 16):
                if self._is_down():
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      struct.pack("ii", 1, 0))
                    break
                then = self._take_after(data)
                if then is not None:
                    pending.append(then)
                hit = self._take(data)
                if hit:
                    cut.set()
                upstream.sendall(data)
                if hit:
                    answered.wait(10)
                    if self._then is not None:
                        self._then()
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      struct.pack("ii", 1, 0))
                    break
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    @staticmethod
    def _down(client: socket.socket, upstream: socket.socket, cut: threading.Event,
              answered: threading.Event, pending: list) -> None:
        """Redis to client; after a hit, the answer is swallowed."""
        try:
            while data := upstream.recv(1 << 16):
                if cut.is_set():
                    answered.set()
                    return
                while pending:  # before the client has the answer: nothing it does
                    pending.pop(0)()  # after it (on any connection) comes first
                client.sendall(data)
        except OSError:
            pass
        finally:
            answered.set()
