"""HTTP answers become the right errors, against real local servers."""
from __future__ import annotations

import contextlib
import json

import pytest

from producer.redis_server import free_port
from worker.errors import (
    BadResponse,
    ConfigError,
    GenerationFailed,
    RateLimited,
    RequestRejected,
    RetryableUpstreamError,
    SubmitOutcomeUnknown,
    UpstreamUnavailable,
)
from worker.generation import Generation, salvaged_id
from worker.settings import Settings
from worker.upstream import UpstreamClient

REQUEST = {"model": "alibaba/wan2.1-t2v-turbo", "prompt": "a kite"}


def _client(base_url: str, key: str, **env) -> UpstreamClient:
    return UpstreamClient(Settings.from_env({"AIMLAPI_BASE_URL": base_url, "AIMLAPI_KEY": key,
                                             "VIDQ_HTTP_TIMEOUT_S": "5", **env}))


@pytest.fixture
def sandbox_client(make_sandbox):
    sandbox = make_sandbox()
    return sandbox, _client(sandbox.url, sandbox.config.api_key)


@pytest.mark.parametrize("status, error", [(503, UpstreamUnavailable), (429, RateLimited)])
def test_retryable_statuses(sandbox_client, status, error):
    """503 and 429 on submit prove nothing was created: retryable; 429 carries Retry-After."""
    sandbox, client = sandbox_client
    import requests
    requests.post(sandbox.url + "/__faults", json={"submit": [status], "retry_after": 7}, timeout=5)
    with pytest.raises(error) as raised:
        client.submit(REQUEST)
    assert isinstance(raised.value, RetryableUpstreamError)
    assert str(status) in str(raised.value)
    if status == 429:
        assert raised.value.retry_after == 7


def test_bad_body_is_terminal_with_the_field_named(sandbox_client):
    """A 400 is terminal and its message names the offending field."""
    _, client = sandbox_client
    with pytest.raises(RequestRejected, match="resolution"):
        client.submit({**REQUEST, "resolution": "1080P"})


def test_unknown_generation_is_rejected(sandbox_client):
    """Fetching an id the upstream does not know is a terminal 404."""
    _, client = sandbox_client
    with pytest.raises(RequestRejected, match="404"):
        client.fetch("00000000-0000-0000-0000-000000000000")


def test_connection_refused_is_retryable():
    """Nobody listening: retryable, and the message names no key."""
    client = _client(f"http://127.0.0.1:{free_port()}", "sk-never-show-me")
    with pytest.raises(UpstreamUnavailable) as raised:
        client.submit(REQUEST)
    assert "sk-never-show-me" not in str(raised.value)


def test_unreadable_submit_answer_is_never_resent(serve_bytes):
    """A 2xx submit without a readable id may have paid: terminal, not retried."""
    with pytest.raises(SubmitOutcomeUnknown, match="paying twice"):
        _client(serve_bytes(b"<html>maintenance</html>"), "k").submit(REQUEST)


# The sandbox's answer to a POST, the id first as the contract shows it.
SUBMIT_ANSWER = json.dumps({"id": "3f1c2d9e-8a7b-4c6d-9e0f-112233445566", "status": "queued",
                            "video": None, "error": None, "meta": None}).encode()
AFTER_ID = SUBMIT_ANSWER.index(b",") + 1  # the id's pair, then the comma that closes it


@pytest.mark.parametrize("how", ["connection lost", "content-length cut"])
def test_a_posts_answer_cut_short_after_its_id_still_names_the_paid_generation(
        serve_bytes, how):
    """The upstream created the generation and its answer broke off mid-body
    (or a gateway cut the body and its Content-Length). The id's pair came
    whole: it is recorded, not thrown away with the job "outcome unknown"."""
    half = len(SUBMIT_ANSWER) // 2
    url = (serve_bytes(SUBMIT_ANSWER, cut_at=half) if how == "connection lost"
           else serve_bytes(SUBMIT_ANSWER[:half]))
    generation = _client(url, "k").submit(REQUEST)
    assert (generation.id, generation.status) == ("3f1c2d9e-8a7b-4c6d-9e0f-112233445566", "queued")
    assert serve_bytes.posts == 1


@pytest.mark.parametrize("cut_at", [AFTER_ID - 2, AFTER_ID - 1, 20])
def test_a_posts_answer_cut_inside_its_id_is_outcome_unknown(serve_bytes, cut_at):
    """Cut before the comma after the id, the id may be shortened: never
    guessed, never re-sent."""
    with pytest.raises(SubmitOutcomeUnknown, match="broke off.*paying twice"):
        _client(serve_bytes(SUBMIT_ANSWER, cut_at=cut_at), "k").submit(REQUEST)
    assert serve_bytes.posts == 1


@pytest.mark.parametrize("status, headers, why", [
    (502, {"Content-Encoding": "gzip"}, "unreadable"),  # ContentDecodingError, a urllib3 error
    (200, {"Content-Encoding": "gzip"}, "could not be decoded"),
    (307, {"Location": "/again"}, "307"),  # followed, it was the POST sent again
])
def test_a_post_whose_answer_cannot_be_read_is_never_sent_again(serve_bytes, status, headers,
                                                                why):
    """Review 130: a 502 whose body said gzip and was not was mapped to "not
    sent, retry", and the POST paid twice; a 307 loop sent it 31 times."""
    url = serve_bytes(b"<html>bad gateway</html>", status=status, headers=headers)
    with pytest.raises(SubmitOutcomeUnknown, match=why):
        _client(url, "k").submit(REQUEST)
    assert serve_bytes.posts == 1


def test_a_posts_answer_in_its_declared_charset_is_read(serve_bytes):
    """A Latin-1 answer (a prompt echoed before the id): read as requests
    reads it, its id recorded (review 130: it ended "outcome unknown")."""
    body = '{"prompt": "caf\u00e9", "id": "gen-1", "status": "queued"}'.encode("latin-1")
    url = serve_bytes(body, headers={"Content-Type": "application/json; charset=iso-8859-1"})
    assert _client(url, "k").submit(REQUEST).id == "gen-1"


@pytest.mark.parametrize("cut", [b'{"id": "A", "id": "B",', b'{"id": "A", "id": null}'])
def test_a_cut_answer_naming_two_ids_names_none(cut):
    """A JSON parser keeps the last of two "id" keys; a cut answer's first
    is not guessed to be the one."""
    assert salvaged_id(cut) is None


ENVOY_503 = b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"


@pytest.mark.parametrize("body, content_type", [
    (b'{"message": "Service Unavailable", "path": "/v2/video/gener', "application/json"),
    (b"", "application/json"),
    (b'"Service Unavailable"', "application/json"),
    (ENVOY_503, "text/plain"),  # a proxy's, but sent after it forwarded the POST
])
def test_a_503_to_a_post_that_is_not_a_proxys_page_is_never_sent_again(serve_bytes, body,
                                                                       content_type):
    """Review 132: only a 503 whose body parsed as a JSON object counted as
    the API's own; one cut short, empty or not an object was taken for a
    proxy's page and POSTed again (two generations in the sandbox's ledger).
    Only an HTML page is a proxy's now."""
    url = serve_bytes(body, status=503, headers={"Content-Type": content_type})
    with pytest.raises(SubmitOutcomeUnknown, match="may have created"):
        _client(url, "k").submit(REQUEST)
    assert serve_bytes.posts == 1


def test_a_proxys_html_503_to_a_post_is_retried(serve_bytes):
    url = serve_bytes(b"<html>Service Unavailable</html>", status=503,
                      headers={"Content-Type": "text/html; charset=utf-8"})
    with pytest.raises(UpstreamUnavailable):  # retryable: the API never saw it
        _client(url, "k").submit(REQUEST)


def test_the_apis_own_503_to_a_post_is_never_sent_again(serve_bytes):
    """The contract lists 503 with the other 5xx and has no idempotency key:
    only a proxy's page (above: the sandbox's, from its load balancer) says
    the API never saw the POST. The API's own JSON 503 was sent again, and
    paid twice if it had created the generation (review 126)."""
    body = {"message": "Service Unavailable", "statusCode": 503, "path": "/v2/video/generations"}
    url = serve_bytes(json.dumps(body).encode(), status=503)
    with pytest.raises(SubmitOutcomeUnknown, match="may have created"):
        _client(url, "k").submit(REQUEST)
    assert serve_bytes.posts == 1


@pytest.mark.parametrize("body, status", [
    ({"id": "g1"}, "queued"),  # the reference client reads only the id
    ({"id": "g1", "status": "complete", "video": {"url": "http://x/v.mp4"}}, "complete")])
def test_the_reference_documents_answers_are_read(serve_bytes, body, status):
    """A submit answered with an id alone had its paid id thrown away ("no
    id/status", outcome unknown, never polled); `complete`, the reference
    document's word, was pending: the video never fetched, its slot held to
    the hard limit (review 126)."""
    generation = _client(serve_bytes(json.dumps(body).encode()), "k").submit(REQUEST)
    assert (generation.id, generation.status) == ("g1", status)
    assert generation.succeeded == (status == "complete")


def test_the_reference_clients_base_url_is_refused_naming_why():
    """`https://api.aimlapi.com/v2`, as the reference client writes it: every
    POST went to /v2/v2/... and each prompt failed on its 404 (review 126)."""
    with pytest.raises(ConfigError, match="ends in /v2"):
        _client("https://api.aimlapi.com/v2/", "k")


def test_unparseable_status_body_is_retryable(serve_bytes):
    """A 2xx status answer that is not the documented JSON is retryable, not a success."""
    with pytest.raises(BadResponse):
        _client(serve_bytes(b"<html>maintenance</html>"), "k").fetch("some-id")


def test_an_absurd_credits_figure_is_read_as_unknown_not_raised(serve_bytes):
    """A completed answer whose credits_used no float holds: the video is still
    there (credits unknown), not an error that would end a paid job."""
    body = {"id": "g", "status": "completed", "video": {"url": "http://x/v.mp4"},
            "meta": {"usage": {"credits_used": 10 ** 400}}}
    generation = _client(serve_bytes(json.dumps(body).encode()), "k").fetch("g")
    assert generation.succeeded and generation.credits_used is None


@pytest.mark.parametrize("status, url, pending, succeeded", [
    ("queued", None, True, False), ("waiting", None, True, False),
    ("active", None, True, False), ("brand-new-status", None, True, False),
    ("completed", None, True, False), ("completed", "http://x/v.mp4", False, True),
    ("succeeded", "http://x/v.mp4", False, True)])
def test_status_interpretation(status, url, pending, succeeded):
    """Unknown statuses and a success without a URL are pending, never success."""
    generation = Generation(id="g", status=status, video_url=url)
    assert (generation.pending, generation.succeeded) == (pending, succeeded)


def test_failed_generation_raises_with_upstream_message():
    """`error` and `failed` both end the generation with the upstream's message."""
    for status in ("error", "failed"):
        with pytest.raises(GenerationFailed, match="NSFW"):
            Generation(id="g", status=status, error_message="NSFW content").raise_if_failed()


def test_submit_read_timeout_is_never_resent():
    """A POST whose answer never came may have been accepted: terminal, not retried."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    client = _client(f"http://127.0.0.1:{listener.getsockname()[1]}", "k",
                     VIDQ_HTTP_TIMEOUT_S="0.5", VIDQ_STEP_GRACE_S="10", VIDQ_POST_DEADLINE_S="2")
    try:
        with pytest.raises(SubmitOutcomeUnknown, match="ReadTimeout"):
            client.submit(REQUEST)
    finally:
        listener.close()
    assert accepted  # the request did reach the server


@pytest.mark.parametrize("status", [500, 502, 504])
def test_submit_statuses_that_may_hide_a_created_generation_are_outcome_unknown(
        sandbox_client, status):
    """500, 502 and 504 may come after the upstream acted: never retried on their own."""
    sandbox, client = sandbox_client
    import requests
    requests.post(sandbox.url + "/__faults", json={"submit": [status]}, timeout=5)
    with pytest.raises(SubmitOutcomeUnknown, match=str(status)):
        client.submit(REQUEST)


def test_submit_to_a_closed_port_is_retryable_not_unknown(make_sandbox):
    """Connection refused: nothing was sent, so a retry cannot pay twice."""
    client = _client(f"http://127.0.0.1:{free_port()}", "sk-x")
    with pytest.raises(UpstreamUnavailable, match="not sent"):
        client.submit(REQUEST)


def _listener():
    """A socket that accepts connections and keeps every byte sent to it."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    received: list[bytes] = []

    def accept():
        with contextlib.suppress(OSError):
            while True:
                connection, _ = listener.accept()
                connection.settimeout(1)
                with contextlib.suppress(OSError), connection:
                    received.append(connection.recv(65536))
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello")

    threading.Thread(target=accept, daemon=True).start()
    return listener, received


@pytest.mark.parametrize("key", ["sk-never-show\nX-Injected: 1", "sk-never-show\u2013me"])
def test_a_key_no_header_can_carry_is_never_sent_not_outcome_unknown(key):
    """Settings refuse such a key; one that got past them (a Settings built in
    code) fails inside the HTTP client before a byte is sent (InvalidHeader,
    UnicodeEncodeError). That is "not sent", retryable with nothing paid,
    not "the answer lost" (which counted the job's credits)."""
    listener, received = _listener()
    client = _client(f"http://127.0.0.1:{listener.getsockname()[1]}", "sk-placeholder")
    client._auth = {"Authorization": f"Bearer {key}"}
    try:
        with pytest.raises(UpstreamUnavailable, match="not sent") as raised:
            client.submit(REQUEST)
    finally:
        listener.close()
    assert raised.value.never_sent
    assert "never-show" not in str(raised.value) and not received


def test_a_bad_header_in_a_posts_answer_is_outcome_unknown_not_never_sent():
    """requests raises InvalidHeader for a bad answer too (Content-Length: 5, 6):
    that POST was sent and may have been paid, so it is never re-sent."""
    listener, received = _listener()
    try:
        with pytest.raises(SubmitOutcomeUnknown, match="InvalidHeader"):
            _client(f"http://127.0.0.1:{listener.getsockname()[1]}", "k").submit(REQUEST)
    finally:
        listener.close()
    assert received and received[0].startswith(b"POST ")
