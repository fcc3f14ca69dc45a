"""FaultProxy in front of a real sandbox: what a client sees, what the upstream did."""
from __future__ import annotations

import hashlib
import socket
import time

import pytest
import requests

from .faultproxy import FaultProxy

SUBMIT = "/v2/video/generations"
BODY = {"model": "alibaba/wan2.1-t2v-turbo", "prompt": "x"}
SLOW_S = 0.3


@pytest.fixture
def sandbox(make_sandbox):
    return make_sandbox(time_scale=900.0)  # a generation completes in about 0.1 s


@pytest.fixture
def proxy(sandbox):
    with FaultProxy(sandbox.url, seed=1, rewrite_urls=True, trickle_interval_s=0.001,
                    slow_s=SLOW_S, timeout_s=5) as proxy:
        yield proxy


def auth(sandbox) -> dict:
    return {"Authorization": f"Bearer {sandbox.config.api_key}"}


def submit(proxy, sandbox, timeout=5.0) -> requests.Response:
    return requests.post(proxy.url + SUBMIT, json=BODY, headers=auth(sandbox), timeout=timeout)


def ledger(sandbox) -> list[dict]:
    return requests.get(sandbox.url + "/__ledger", timeout=5).json()


def wait_completed(proxy, sandbox, gen_id: str) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        answer = requests.get(proxy.url + SUBMIT, params={"generation_id": gen_id},
                              headers=auth(sandbox), timeout=5).json()
        if answer["status"] == "completed":
            return answer
        time.sleep(0.05)
    raise AssertionError(f"{gen_id} not completed")


def test_clean_passthrough_forwards_auth_and_body(proxy, sandbox):
    response = submit(proxy, sandbox)
    assert response.status_code == 201 and response.headers["Connection"] == "close"
    [entry] = ledger(sandbox)
    assert entry["id"] == response.json()["id"] and entry["body"]["prompt"] == "x"
    assert requests.post(proxy.url + SUBMIT, json=BODY, timeout=5).status_code == 401
    assert proxy.counts == {"forwarded": 2}


@pytest.mark.parametrize("kind, expected", [
    ("reset_after_send", requests.ConnectionError),
    ("close_after_send", requests.ConnectionError),
    ("gateway_502", 502),
    ("gateway_504", 504),
])
def test_forwarded_then_lost_or_replaced(proxy, sandbox, kind, expected):
    proxy.queue(kind)
    if isinstance(expected, int):
        response = submit(proxy, sandbox)
        assert response.status_code == expected
        assert response.headers["Content-Type"] == "text/html" and "<html>" in response.text
    else:
        with pytest.raises(expected):
            submit(proxy, sandbox)
    assert len(ledger(sandbox)) == 1  # the upstream acted on it anyway
    assert proxy.counts == {kind: 1, "forwarded": 1}
    assert submit(proxy, sandbox).status_code == 201  # one fault queued, one served


def test_reset_after_send_is_a_reset(proxy, sandbox):
    proxy.queue("reset_after_send")
    with pytest.raises(requests.ConnectionError) as caught:
        submit(proxy, sandbox)
    assert "reset" in str(caught.value).lower()


def test_truncate_json_is_2xx_with_unreadable_body(proxy, sandbox):
    proxy.queue("truncate_json")
    response = submit(proxy, sandbox)
    assert response.status_code == 201
    assert int(response.headers["Content-Length"]) == len(response.content)
    with pytest.raises(requests.JSONDecodeError):
        response.json()
    assert len(ledger(sandbox)) == 1


def test_trickle_delivers_everything_slowly(proxy, sandbox):
    proxy.queue("trickle")
    started = time.monotonic()
    response = submit(proxy, sandbox)
    assert response.status_code == 201 and response.json()["status"] == "queued"
    assert time.monotonic() - started > 200 * proxy.trickle_interval_s  # ~300 bytes
    assert len(ledger(sandbox)) == 1


def test_trickle_slower_than_read_timeout_times_out(proxy, sandbox):
    proxy.trickle_interval_s = 0.3
    proxy.queue("trickle")
    with pytest.raises(requests.ReadTimeout):
        submit(proxy, sandbox, timeout=(2, 0.1))
    time.sleep(0.1)
    assert len(ledger(sandbox)) == 1


def test_slow_headers_delays_then_forwards(proxy, sandbox):
    proxy.queue("slow_headers", count=2)
    started = time.monotonic()
    assert submit(proxy, sandbox).status_code == 201
    assert time.monotonic() - started >= SLOW_S
    with pytest.raises(requests.ReadTimeout):
        submit(proxy, sandbox, timeout=(2, SLOW_S / 3))
    time.sleep(SLOW_S)  # the proxy still forwards after the client gave up
    assert len(ledger(sandbox)) == 2


@pytest.mark.parametrize("kind, status", [("html_500", 500), ("503", 503), ("429", 429)])
def test_local_answers_never_reach_upstream(proxy, sandbox, kind, status):
    proxy.queue(kind)
    response = submit(proxy, sandbox)
    assert response.status_code == status
    if kind != "429":  # the proxy's own page: the API never saw the request
        assert response.headers["Content-Type"] == "text/html"
    else:
        assert response.json()["statusCode"] == status
    if kind != "html_500":
        assert response.headers["Retry-After"] == "1"
    assert ledger(sandbox) == [] and proxy.counts == {kind: 1}


def test_refuse_closes_without_reading(proxy, sandbox):
    proxy.queue("refuse")
    with pytest.raises(requests.ConnectionError):
        submit(proxy, sandbox)
    assert ledger(sandbox) == [] and proxy.counts == {"refuse": 1}


def test_pause_listening_gives_connection_refused_on_same_port(proxy, sandbox):
    port = proxy.port
    proxy.pause_listening()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with pytest.raises(requests.ConnectionError):
        submit(proxy, sandbox)
    proxy.resume_listening()
    assert proxy.port == port and submit(proxy, sandbox).status_code == 201


def test_rewritten_download_and_truncate_body(proxy, sandbox):
    gen_id = submit(proxy, sandbox).json()["id"]
    url = wait_completed(proxy, sandbox, gen_id)["video"]["url"]
    assert url.startswith(proxy.url + "/files/")
    proxy.queue("truncate_body", method="GET", path_prefix="/files/")
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(url, timeout=5)
    video = requests.get(url, timeout=5)
    [entry] = ledger(sandbox)
    assert video.status_code == 200 and len(video.content) == entry["size"]
    assert hashlib.sha256(video.content).hexdigest() == entry["sha256"]
    assert entry["downloads"] == 2  # the truncated one was served by the upstream too


def test_queue_matches_method_only(proxy, sandbox):
    proxy.queue("503", method="POST")
    assert requests.get(proxy.url + SUBMIT, params={"generation_id": "nope"},
                        headers=auth(sandbox), timeout=5).status_code == 404
    assert submit(proxy, sandbox).status_code == 503


def test_rates_are_seeded_and_filtered(sandbox):
    def pattern() -> list[int]:
        with FaultProxy(sandbox.url, seed=3) as proxy:
            proxy.set_rates({"503": 0.5}, methods="GET", path_prefix="/__")
            statuses = [requests.get(proxy.url + "/__stats", timeout=5).status_code
                        for _ in range(30)]
            assert submit(proxy, sandbox).status_code == 201  # POST is not covered
            proxy.set_rates({}, methods="GET", path_prefix="/__")
            assert requests.get(proxy.url + "/__stats", timeout=5).status_code == 200
            assert proxy.counts["503"] == statuses.count(503)
            return statuses

    first = pattern()
    assert 5 < first.count(503) < 25 and set(first) == {200, 503}
    assert pattern() == first


def test_unknown_kind_and_bad_rates_are_rejected(proxy):
    with pytest.raises(ValueError):
        proxy.queue("teapot")
    with pytest.raises(ValueError):
        proxy.set_rates({"503": 0.7, "429": 0.5})


def test_a_storm_answers_every_request_for_its_time_then_none(proxy, sandbox):
    """A rate limiter's storm is a window of time: every request in it gets a
    429 (as many as come), none after it."""
    proxy.queue_for("429", seconds=0.5)
    during = [submit(proxy, sandbox).status_code for _ in range(5)]
    time.sleep(0.6)
    after = submit(proxy, sandbox)

    assert during == [429] * 5 and after.status_code in (200, 201)
    assert proxy.counts == {"429": 5, "forwarded": 1} and len(ledger(sandbox)) == 1
