"""A POST's last check, made on its open connection before its first byte.

The POST thread checks that its job is still its step's right before sending
(posting.on_the_wire). Made before `requests` opened the connection, that
check left the connect itself unguarded (DNS, TCP, TLS: ~100-300 ms against
the real API): a worker host suspended there while another took the job over
sent the POST when it woke, after the job's slot had gone to another: C + 1
(review 122). `checked_session` makes the check again once the connection is
open, so what remains is the write itself. (Behind a proxy, requests uses
its own pool classes: the earlier check only.)
"""
from __future__ import annotations

from collections.abc import Callable

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool


def checked_session(check: Callable[[], None]) -> requests.Session:
    """A session whose requests call `check()` once their connection is open,
    before anything is written; it raises to withhold the request."""

    class CheckedHTTP(HTTPConnection):
        def request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            _connected_then_checked(self, check)
            return super().request(*args, **kwargs)

    class CheckedHTTPS(HTTPSConnection):
        def request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            _connected_then_checked(self, check)
            return super().request(*args, **kwargs)

    class HTTPPool(HTTPConnectionPool):
        ConnectionCls = CheckedHTTP

    class HTTPSPool(HTTPSConnectionPool):
        ConnectionCls = CheckedHTTPS

    class CheckedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": HTTPPool, "https": HTTPSPool}

    session = requests.Session()
    for prefix in ("http://", "https://"):
        session.mount(prefix, CheckedAdapter())
    return session


def _connected_then_checked(connection: HTTPConnection, check: Callable[[], None]) -> None:
    # An HTTPS connection is opened (TLS included) by its pool before this;
    # a plain one would open on its first write.
    if connection.sock is None:
        connection.connect()
    check()
