"""A fault-injecting HTTP/1.1 reverse proxy for chaos tests (stdlib only).

    proxy = FaultProxy(sandbox.url, seed=1, rewrite_urls=True).start()  # proxy.url
    proxy.queue("reset_after_send", count=1, method="POST")  # next matching request(s)
    proxy.set_rates({"503": 0.1, "trickle": 0.05}, methods="GET", path_prefix="/v2/")
    proxy.counts; proxy.stop()  # counts: {"503": 3, ..., "forwarded": 41}

One request per connection: `Connection: close` is used towards the upstream and the
client. Everything else (method, target, headers, body) is forwarded byte for byte,
except `Host`, which names the upstream. The fault is chosen once per connection from
its request line, which is peeked (not consumed): queued faults first, then the
random rates of every `set_rates` rule that matches. `counts["forwarded"]` counts
requests sent upstream, whatever the fault.

Fault kinds, forwarded (the upstream acts on the request):
    reset_after_send  upstream answers; the client gets a TCP RST and not one byte
    close_after_send  upstream answers; the client gets a clean FIN and not one byte
    gateway_502/_504  upstream answer discarded; the client gets 502/504 with HTML
    trickle           the answer, headers included, one byte per `trickle_interval_s`
    throttle          the answer at `throttle_bps` bytes per second (a slow CDN; read
                      as it goes, as `trickle_interval_s` is)
    truncate_json     the answer with its body cut in half and a matching Content-Length
    truncate_body     the true Content-Length but half the body, then close
    slow_headers      nothing for `slow_s` seconds, then forwarded normally
Not forwarded:
    html_500          500 with an HTML body
    503               an HTML page with `Retry-After: 1`: the proxy's own answer (the
                      API never saw the request; its own JSON 503 to a POST is "outcome
                      unknown")
    429               a small JSON error with `Retry-After: 1`
    refuse            closed right after accept without reading the request (the kernel
                      then sends RST). A real ECONNREFUSED needs a closed port:
                      `pause_listening()` closes the listening socket and
                      `resume_listening()` reopens it on the same port.

With `rewrite_urls=True`, occurrences of the upstream base URL in JSON response bodies
become the proxy's URL (Content-Length fixed), so result downloads go through it too.
"""

from __future__ import annotations

import json
import math
import random
import socket
import struct
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

FORWARDING_KINDS = frozenset({
    "reset_after_send", "close_after_send", "gateway_502", "gateway_504",
    "trickle", "throttle", "truncate_json", "truncate_body", "slow_headers"})
LOCAL_KINDS = frozenset({"html_500", "503", "429", "refuse"})
KINDS = FORWARDING_KINDS | LOCAL_KINDS
REASONS = {429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout"}
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection"}
MAX_REQUEST_LINE = 8192


class FaultProxy:
    def __init__(self, upstream_url: str, seed: int | None = None, rewrite_urls: bool = False,
                 host: str = "127.0.0.1", port: int = 0, trickle_interval_s: float = 0.05,
                 slow_s: float = 1.0, timeout_s: float = 30.0):
        parts = urlsplit(upstream_url)
        self.upstream_url = f"http://{parts.netloc}"
        self.upstream = (parts.hostname, parts.port or 80)
        self.rewrite_urls, self.host, self.port = rewrite_urls, host, port
        self.trickle_interval_s, self.slow_s, self.timeout_s = trickle_interval_s, slow_s, timeout_s
        self.throttle_bps = 100_000
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._rules: dict[tuple, list[tuple[str, float]]] = {}
        # [kind, method or None, path_prefix, remaining, until (monotonic; inf: none)]
        self._queued: list[list] = []
        self._counts: Counter[str] = Counter()
        self._listener: tuple[threading.Event, threading.Thread] | None = None

    # -- lifecycle -----------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FaultProxy:
        self.resume_listening()
        return self

    def stop(self) -> None:
        self.pause_listening()

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    def resume_listening(self) -> None:
        """(Re)open the listening socket, on the same port once one was picked."""
        if self._listener:
            return
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        sock.settimeout(0.05)  # lets the accept loop notice pause/stop
        self.port = sock.getsockname()[1]
        stop = threading.Event()
        thread = threading.Thread(target=self._accept_loop, args=(sock, stop), daemon=True,
                                  name=f"faultproxy-{self.port}")
        self._listener = (stop, thread)
        thread.start()

    def pause_listening(self) -> None:
        """Close the listening socket: new connections get ECONNREFUSED until resumed."""
        if self._listener:
            self._listener[0].set()
            self._listener[1].join()  # the accept loop closes the socket on its way out
            self._listener = None

    def _accept_loop(self, sock: socket.socket, stop: threading.Event) -> None:
        with sock:
            while not stop.is_set():
                try:
                    conn, _ = sock.accept()
                except OSError:  # mostly the 0.05 s timeout
                    continue
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    # -- fault rules ---------------------------------------------------------
    def set_rates(self, rates: dict[str, float], methods=None, path_prefix: str = "") -> None:
        """Random faults for requests matching methods (None: any) and path_prefix.

        Replaces the rule with the same methods and prefix; `{}` removes it."""
        _check_kinds(rates)
        if any(p < 0 for p in rates.values()) or sum(rates.values()) > 1:
            raise ValueError("probabilities must be >= 0 and sum to at most 1")
        if isinstance(methods, str):
            methods = (methods,)
        key = (frozenset(m.upper() for m in methods) if methods else None, path_prefix)
        with self._lock:
            self._rules.pop(key, None)
            if any(rates.values()):
                self._rules[key] = sorted(rates.items())

    def queue(self, kind: str, count: int = 1, method: str | None = "POST",
              path_prefix: str = "") -> None:
        """The next `count` requests matching method (None: any) and prefix get `kind`."""
        _check_kinds([kind])
        with self._lock:
            self._queued.append([kind, method and method.upper(), path_prefix, count, math.inf])

    def queue_for(self, kind: str, seconds: float, method: str | None = "POST",
                  path_prefix: str = "") -> None:
        """Every request matching method (None: any) and prefix for `seconds` gets `kind`:
        a rate limiter's storm is a window of time, not a number of answers."""
        _check_kinds([kind])
        with self._lock:
            self._queued.append([kind, method and method.upper(), path_prefix, math.inf,
                                 time.monotonic() + seconds])

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self._queued.clear()

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def _choose(self, method: str, path: str) -> str | None:
        with self._lock:
            kind = self._take_queued(method, path) or self._draw(method, path)
            if kind:
                self._counts[kind] += 1
            return kind

    def _take_queued(self, method: str, path: str) -> str | None:
        now = time.monotonic()
        self._queued = [entry for entry in self._queued if entry[4] > now]
        for entry in self._queued:
            kind, want, prefix, _, _ = entry
            if want in (None, method) and path.startswith(prefix):
                entry[3] -= 1
                if entry[3] <= 0:
                    self._queued.remove(entry)
                return kind
        return None

    def _draw(self, method: str, path: str) -> str | None:
        for (methods, prefix), rates in self._rules.items():
            if (methods is None or method in methods) and path.startswith(prefix):
                roll = self._rng.random()
                for kind, probability in rates:
                    if roll < probability:
                        return kind
                    roll -= probability
        return None

    # -- one connection ------------------------------------------------------
    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(self.timeout_s)
                method, target = _peek_request_line(conn, self.timeout_s)
                kind = self._choose(method, urlsplit(target).path)
                if kind == "refuse":
                    return  # closed with the request unread
                request = _read_request(conn, urlsplit(self.upstream_url).netloc.encode())
                if kind in LOCAL_KINDS:
                    return conn.sendall(_local_answer(kind))
                if kind == "slow_headers":
                    time.sleep(self.slow_s)
                try:
                    answer = self._forward(request)
                except OSError:
                    return conn.sendall(_html(502))
                self._deliver(conn, kind, answer)
            except (OSError, ValueError):
                pass  # the client went away or spoke garbage: nothing to answer

    def _forward(self, request: bytes) -> bytes:
        with self._lock:
            self._counts["forwarded"] += 1
        with socket.create_connection(self.upstream, timeout=self.timeout_s) as upstream:
            upstream.sendall(request)
            chunks = []
            while chunk := upstream.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    def _deliver(self, conn: socket.socket, kind: str | None, answer: bytes) -> None:
        if kind == "reset_after_send":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if kind in ("reset_after_send", "close_after_send"):
            return
        if kind in ("gateway_502", "gateway_504"):
            return conn.sendall(_html(int(kind[-3:])))
        start, fields, body = _split_message(answer)
        length = None
        if self.rewrite_urls and b"json" in (_header(fields, b"content-type") or b""):
            new = body.replace(self.upstream_url.encode(), self.url.encode())
            body, length = new, (len(new) if new != body else None)
        if kind in ("truncate_json", "truncate_body"):
            length = len(body) // 2 if kind == "truncate_json" else len(body)
            body = body[: len(body) // 2]
        replace = {b"content-length": str(length).encode()} if length is not None else {}
        payload = _build(start, fields, replace) + body
        if kind == "throttle":
            sent = 0
            while sent < len(payload):  # the rate read each time: a test may change it
                step = max(1, self.throttle_bps // 10)
                conn.sendall(payload[sent:sent + step])
                sent += step
                time.sleep(0.1)
            return
        if kind != "trickle":
            return conn.sendall(payload)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one segment per byte
        for byte in payload:
            conn.sendall(bytes((byte,)))
            time.sleep(self.trickle_interval_s)


# -- HTTP plumbing -----------------------------------------------------------
def _check_kinds(kinds) -> None:
    unknown = set(kinds) - KINDS
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {sorted(KINDS)}")


def _peek_request_line(conn: socket.socket, timeout_s: float) -> tuple[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        data = conn.recv(MAX_REQUEST_LINE, socket.MSG_PEEK)
        if not data or len(data) >= MAX_REQUEST_LINE:
            break
        if b"\r\n" in data:
            method, target, _ = data.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            return method.upper(), target
        time.sleep(0.002)  # a partial line: wait for more without consuming it
    raise ValueError("no request line")


def _recv_until(conn: socket.socket, data: bytes, done) -> bytes:
    while not done(data):
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("client closed mid-request")
        data += chunk
    return data


def _chunked_end(body: bytes) -> int | None:
    """Where a chunked body (with trailers) ends, or None if incomplete."""
    pos = 0
    while (eol := body.find(b"\r\n", pos)) >= 0:
        size = int(body[pos:eol].split(b";")[0], 16)
        if size == 0:
            end = body.find(b"\r\n\r\n", eol)
            return None if end < 0 else end + 4
        pos = eol + 2 + size + 2
    return None


def _read_request(conn: socket.socket, upstream_host: bytes) -> bytes:
    """The request, rewritten for the upstream (Host, Connection: close)."""
    data = _recv_until(conn, b"", lambda d: b"\r\n\r\n" in d)
    start, fields, body = _split_message(data)
    if b"chunked" in (_header(fields, b"transfer-encoding") or b"").lower():
        body = _recv_until(conn, body, lambda b: _chunked_end(b) is not None)
    else:
        length = int(_header(fields, b"content-length") or 0)
        body = _recv_until(conn, body, lambda b: len(b) >= length)[:length]
    return _build(start, fields, {b"host": upstream_host}) + body


def _split_message(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    start, *lines = head.split(b"\r\n")
    fields = [(name, value) for name, _, value in (line.partition(b":") for line in lines)]
    return start, fields, body


def _header(fields, name: bytes) -> bytes | None:
    return next((v.strip() for n, v in fields if n.strip().lower() == name), None)


def _build(start: bytes, fields, replace: dict[bytes, bytes]) -> bytes:
    """Head with hop-by-hop fields dropped, `replace` applied in place, Connection: close."""
    lines = [start]
    for name, value in fields:
        key = name.strip().lower()
        if key in HOP_BY_HOP:
            continue
        if key in replace:
            value = b" " + replace[key]
        lines.append(name + b":" + value)
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _canned(status: int, content_type: str, body: bytes, extra: str = "") -> bytes:
    head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n")
    return head.encode() + body


def _html(status: int, extra: str = "") -> bytes:
    title = f"{status} {REASONS[status]}"
    body = (f"<html><head><title>{title}</title></head><body><center><h1>{title}</h1>"
            "</center><hr><center>faultproxy</center></body></html>\r\n")
    return _canned(status, "text/html", body.encode(), extra)


def _local_answer(kind: str) -> bytes:
    if kind == "html_500":
        return _html(500)
    if kind == "503":
        return _html(503, "Retry-After: 1\r\n")
    status = int(kind)
    body = json.dumps({"statusCode": status, "message": REASONS[status]}).encode()
    return _canned(status, "application/json; charset=utf-8", body, "Retry-After: 1\r\n")
