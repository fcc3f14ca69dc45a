"""HTTP request handler imitating the AI/ML API video endpoints (stdlib only).

The handler is stateless; it reaches the sandbox's state through
`self.server.state` and its config through `self.server.config`.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import re
import sys
import traceback
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from sandbox.state import FAULT_KINDS, DownloadDenied, Fault, RateLimited, SandboxState
from sandbox.validation import body_error
from sandbox.videos import CHUNK_BYTES, VideoFile

if TYPE_CHECKING:  # sandbox.server imports this module
    from sandbox.server import SandboxHTTPServer

GENERATION_ENDPOINTS = {
    "/v2/video/generations": "universal",
    "/v2/generate/video/alibaba/generation": "legacy",
}
SUBMIT_STATUS = {"universal": 201, "legacy": 200}  # as the two real endpoints answer
FILE_PATH = re.compile(r"^/files/([A-Za-z0-9-]+)\.mp4$")
RANGE_HEADER = re.compile(r"^bytes=(\d*)-(\d*)$")
FAULT_MESSAGES = {403: "Insufficient credits", 504: "Generation timeout"}


class BadRequest(Exception):
    """A client error that ends the request with a 400 JSON body."""


class SandboxRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response sets Content-Length
    server_version = "vidq-sandbox"
    timeout = 120  # drop idle keep-alive connections eventually
    server: SandboxHTTPServer  # narrows BaseRequestHandler.server; set by socketserver

    @property
    def state(self) -> SandboxState:
        return self.server.state

    # -- dispatch ------------------------------------------------------------
    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.url_path, self.query = url.path, parse_qs(url.query)
        self.raw_body = self._read_body()  # always drained so keep-alive stays in sync
        endpoint = GENERATION_ENDPOINTS.get(self.url_path)
        try:
            if endpoint and method == "POST":
                self._submit(endpoint)
            elif endpoint and method == "GET":
                self._poll()
            elif method in ("GET", "HEAD") and self.url_path.startswith("/files/"):
                self._download(send_body=method == "GET")
            elif (method, self.url_path) in ADMIN_ROUTES:
                ADMIN_ROUTES[(method, self.url_path)](self)
            else:
                self._send_error_json(404, f"Cannot {method} {self.url_path}")
        except BadRequest as problem:
            self._send_error_json(400, str(problem))
        except Exception:  # a sandbox bug must still answer like a server would
            self.log_error("internal error on %s %s:\n%s", method, self.url_path,
                           traceback.format_exc())
            self.close_connection = True
            self._send_error_json(500, "Internal server error")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json_body(self) -> object:
        try:
            return json.loads(self.raw_body or b"null")
        except ValueError as problem:
            raise BadRequest(f"body: invalid JSON ({problem})") from None

    def _is_authorized(self) -> bool:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        expected = self.server.config.api_key
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), expected)

    # -- provider endpoints --------------------------------------------------
    def _submit(self, endpoint: str) -> None:
        fault = self.state.take_fault("submit")
        if fault or not self._is_authorized():
            status = fault.status if fault else 401
            self.state.count_rejected_submission(status)
            return self._send_fault(fault) if fault else self._send_unauthorized()
        try:
            body = self._json_body()
            problem = body_error(body, endpoint)
            if problem:
                raise BadRequest(problem)
            if not isinstance(body, dict):  # the schema requires an object
                raise BadRequest("body: must be an object")
            gen = self.state.submit(body, endpoint)
        except BadRequest:
            self.state.count_rejected_submission(400)
            raise
        except RateLimited as limited:
            return self._send_error_json(
                429, "Too many concurrent generations; retry later",
                {"Retry-After": str(limited.retry_after)})
        self._send_json(SUBMIT_STATUS[endpoint], {
            "id": gen.id, "status": "queued", "video": None, "error": None, "meta": None})

    def _poll(self) -> None:
        fault = self.state.take_fault("poll")
        if fault:
            return self._send_fault(fault)
        if not self._is_authorized():
            return self._send_unauthorized()
        gen_id = (self.query.get("generation_id") or [""])[0]
        if not gen_id:
            raise BadRequest("generation_id: is required")
        response = self.state.poll(gen_id, self.server.file_base_url(self.headers.get("Host")))
        if response is None:
            return self._send_error_json(404, f"Generation {gen_id} not found")
        self._send_json(200, response)

    def _download(self, send_body: bool) -> None:
        fault = self.state.take_fault("download") if send_body else None
        if fault:
            return self._send_fault(fault)
        match = FILE_PATH.match(self.url_path)
        if not match:
            return self._send_error_json(404, f"Cannot GET {self.url_path}")
        try:
            video = self.state.authorize_download(
                match.group(1), (self.query.get("Expires") or [""])[0],
                (self.query.get("Signature") or [""])[0], count=send_body)
        except DownloadDenied as denied:
            # Object stores answer denied links in XML, not the API's JSON.
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{denied.code}'
                   f"</Code><Message>{denied.message}</Message></Error>\n")
            return self._send(denied.status, xml.encode(), "application/xml")
        self._stream_file(video, send_body)

    def _byte_range(self, size: int) -> tuple[int, int] | None:
        """Inclusive (first, last) of a single-range request, else the whole file."""
        match = RANGE_HEADER.match(self.headers.get("Range", "").strip())
        if not match or match.groups() == ("", ""):
            return None  # absent or unsupported (e.g. multi-range): send it all
        first, last = match.groups()
        if not first:  # "bytes=-N": the last N bytes
            return max(0, size - int(last)), size - 1
        return int(first), min(int(last), size - 1) if last else size - 1

    def _stream_file(self, video: VideoFile, send_body: bool) -> None:
        byte_range = self._byte_range(video.size)
        first, last = byte_range or (0, video.size - 1)
        if first > last or first >= video.size:
            return self._send(416, b"", "video/mp4", {"Content-Range": f"bytes */{video.size}"})
        with open(video.path, "rb") as source:  # opened first: a missing file is a 500
            self.send_response(206 if byte_range else 200)
            headers = {"Content-Type": "video/mp4", "Content-Length": str(last - first + 1),
                       "Accept-Ranges": "bytes"}
            if byte_range:
                headers["Content-Range"] = f"bytes {first}-{last}/{video.size}"
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if send_body:
                self._copy_chunks(source, first, last - first + 1)

    def _copy_chunks(self, source, offset: int, remaining: int) -> None:
        source.seek(offset)
        try:
            while remaining > 0 and (chunk := source.read(min(CHUNK_BYTES, remaining))):
                self.wfile.write(chunk)
                remaining -= len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # client gave up mid-download; not our error

    # -- sandbox control endpoints -------------------------------------------
    def _stats(self) -> None:
        self._send_json(200, self.state.stats())

    def _ledger(self) -> None:
        self._send_json(200, self.state.ledger())

    def _add_faults(self) -> None:
        spec = self._json_body()
        if not isinstance(spec, dict):
            raise BadRequest("body: must be an object")
        for kind in FAULT_KINDS:
            statuses = spec.get(kind, [])
            if not isinstance(statuses, list) or not all(
                    isinstance(s, int) and 400 <= s <= 599 for s in statuses):
                raise BadRequest(f"{kind}: must be a list of HTTP error statuses (400-599)")
        retry_after = spec.get("retry_after", 1)
        if retry_after is not None and (not isinstance(retry_after, int) or retry_after < 0):
            raise BadRequest("retry_after: must be a non-negative integer, or null for none")
        self._send_json(200, {"queued": self.state.add_faults(spec)})

    def _reset(self) -> None:
        self.state.reset()
        self._send_json(200, {"ok": True})

    def _expire(self) -> None:
        self._on_generation(self.state.expire_url)

    def _forget(self) -> None:
        self._on_generation(self.state.forget)

    def _on_generation(self, action) -> None:
        spec = self._json_body()
        gen_id = spec.get("id") if isinstance(spec, dict) else None
        if not isinstance(gen_id, str):
            raise BadRequest("id: is required")
        if not action(gen_id):
            return self._send_error_json(404, f"Generation {gen_id} not found")
        self._send_json(200, {"ok": True})

    # -- responses -----------------------------------------------------------
    def _send(self, status: int, payload: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _send_json(self, status: int, payload: object, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json; charset=utf-8",
                   headers)

    def _send_error_json(self, status: int, message: str, headers: dict | None = None) -> None:
        self._send_json(status, {
            "message": message, "path": self.url_path, "requestId": str(uuid.uuid4()),
            "statusCode": status,
            "timestamp": dt.datetime.now(dt.UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
        }, headers)

    def _send_unauthorized(self) -> None:
        self._send_error_json(401, "Unauthorized: missing or invalid API key")

    def _send_fault(self, fault: Fault) -> None:
        if fault.status == 503:  # as a load balancer in front of the API would
            return self._send(503, b"<html>Service Unavailable</html>", "text/html")
        # retry_after None: a 429 without the header, as the contract allows
        headers = ({"Retry-After": str(fault.retry_after)}
                   if fault.status == 429 and fault.retry_after is not None else None)
        try:
            phrase = HTTPStatus(fault.status).phrase
        except ValueError:
            phrase = "Error"
        self._send_error_json(fault.status, FAULT_MESSAGES.get(fault.status, phrase), headers)

    # -- logging -------------------------------------------------------------
    def log_message(self, format: str, *args) -> None:
        if self.server.config.log_requests:
            super().log_message(format, *args)

    def log_error(self, format: str, *args) -> None:
        if "timed out" not in format:  # idle keep-alive timeouts are routine
            sys.stderr.write(f"sandbox: {self.address_string()} {format % args}\n")


ADMIN_ROUTES = {
    ("GET", "/__stats"): SandboxRequestHandler._stats,
    ("GET", "/__ledger"): SandboxRequestHandler._ledger,
    ("POST", "/__faults"): SandboxRequestHandler._add_faults,
    ("POST", "/__reset"): SandboxRequestHandler._reset,
    ("POST", "/__expire"): SandboxRequestHandler._expire,
    ("POST", "/__forget"): SandboxRequestHandler._forget,
}
