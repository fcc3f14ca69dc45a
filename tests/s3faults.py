"""An HTTP proxy in front of a real S3 endpoint (moto's server) that answers
chosen requests with S3's own error, for the storage-fault tests:

    proxy = S3FaultProxy(moto_url)             # point AWS_ENDPOINT_URL at proxy.url
    proxy.fail(lambda req: req.method == "HEAD", status=503, count=6)

A rule sees the request's method, path and headers (a metadata copy is a PUT
with `x-amz-copy-source`); the first rule with tries left answers it with
S3's error for its status (CODES), and anything else is forwarded as is.
"""
from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

CODES = {403: "AccessDenied", 500: "InternalError", 503: "SlowDown",
         507: "XMinioStorageFull"}  # 507: MinIO's full disk
DROPPED = {"connection", "transfer-encoding", "expect"}


@dataclass
class S3Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Rule:
    match: Callable[[S3Request], bool]
    status: int
    count: int
    hits: int = 0


class S3FaultProxy:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rules: list[Rule] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_any(self):
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail(self, match: Callable[[S3Request], bool], status: int = 503,
             count: int = 1) -> Rule:
        rule = Rule(match, status, count)
        with self.lock:
            self.rules.append(rule)
        return rule

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _rule_for(self, request: S3Request) -> Rule | None:
        with self.lock:
            for rule in self.rules:
                if rule.count > 0 and rule.match(request):
                    rule.count -= 1
                    rule.hits += 1
                    return rule
        return None

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        body = _read_body(handler, headers)
        request = S3Request(handler.command, urlsplit(handler.path).path, headers)
        rule = self._rule_for(request)
        if rule is not None:
            error = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{CODES[rule.status]}'
                     '</Code><Message>injected</Message><RequestId>r</RequestId></Error>')
            return _answer(handler, rule.status, [("Content-Type", "application/xml")],
                           error.encode())
        connection = http.client.HTTPConnection(*self.upstream, timeout=60)
        sent = {k: v for k, v in handler.headers.items() if k.lower() not in DROPPED}
        sent["Content-Length"] = str(len(body))
        connection.request(handler.command, handler.path, body=body, headers=sent)
        response = connection.getresponse()
        data = response.read()
        kept = [(k, v) for k, v in response.getheaders()
                if k.lower() not in DROPPED | {"content-length", "server", "date"}]
        _answer(handler, response.status, kept, data)
        connection.close()


def _read_body(handler: BaseHTTPRequestHandler, headers: dict[str, str]) -> bytes:
    if "content-length" in headers:
        return handler.rfile.read(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() != "chunked":
        return b""
    chunks = []
    while size := int(handler.rfile.readline().split(b";")[0].strip(), 16):
        chunks.append(handler.rfile.read(size))
        handler.rfile.readline()
    while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
        pass
    return b"".join(chunks)


def _answer(handler: BaseHTTPRequestHandler, status: int, headers: list, body: bytes) -> None:
    handler.send_response(status)
    for name, value in headers:
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)
