"""The sandbox imitation of the AI/ML API, exercised over real HTTP."""

from __future__ import annotations

import hashlib
import io
import time
from concurrent.futures import ThreadPoolExecutor

import av
import pytest
import requests

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
UNIVERSAL = "/v2/video/generations"
LEGACY = "/v2/generate/video/alibaba/generation"
MODEL = "alibaba/wan2.1-t2v-turbo"
ERROR_KEYS = {"message", "path", "requestId", "statusCode", "timestamp"}


@pytest.fixture
def start_sandbox(make_sandbox):
    """Factory: a running sandbox; generations take ~1 s (90 s at 90x) by default."""
    return lambda **overrides: make_sandbox(**{"api_key": API_KEY, "max_concurrency": 20,
                                               **overrides})


def body(prompt="a red fox runs through snow", **fields):
    return {"model": MODEL, "prompt": prompt, **fields}


def submit(srv, path=UNIVERSAL, headers=AUTH, **fields):
    return requests.post(srv.url + path, json=body(**fields), headers=headers, timeout=10)


def poll(srv, gen_id, path=UNIVERSAL):
    return requests.get(srv.url + path, params={"generation_id": gen_id}, headers=AUTH,
                        timeout=10)


def wait_until_done(srv, gen_id, path=UNIVERSAL, deadline_s=10.0):
    """Poll until a terminal status; returns (last response, statuses seen)."""
    seen, stop_at = [], time.monotonic() + deadline_s
    while time.monotonic() < stop_at:
        response = poll(srv, gen_id, path).json()
        seen.append(response["status"])
        if response["status"] in ("completed", "error"):
            return response, seen
        time.sleep(0.05)
    raise AssertionError(f"generation {gen_id} still {seen[-1]} after {deadline_s}s")


def ledger_entry(srv, gen_id):
    entries = requests.get(srv.url + "/__ledger", timeout=10).json()
    return next(entry for entry in entries if entry["id"] == gen_id)


def test_requests_without_valid_key_are_401(start_sandbox):
    srv = start_sandbox()
    missing = submit(srv, headers={})
    wrong = submit(srv, headers={"Authorization": "Bearer nope"})
    polled = requests.get(srv.url + UNIVERSAL, params={"generation_id": "x"}, timeout=10)
    assert [missing.status_code, wrong.status_code, polled.status_code] == [401, 401, 401]
    assert set(missing.json()) == ERROR_KEYS and missing.json()["statusCode"] == 401
    assert srv.stats()["rejected_submissions"] == 2 and srv.stats()["submissions"] == 0


def test_invalid_body_is_400_naming_the_field(start_sandbox):
    srv = start_sandbox()
    bad_resolution = submit(srv, resolution="1080P")
    assert bad_resolution.status_code == 400
    error = bad_resolution.json()
    assert set(error) == ERROR_KEYS and error["statusCode"] == 400
    assert error["message"].startswith("resolution:") and error["path"] == UNIVERSAL
    # The legacy endpoint names its expansion flag differently.
    legacy_flag = submit(srv, LEGACY, enable_prompt_expansion="yes")
    assert legacy_flag.status_code == 400
    assert legacy_flag.json()["message"].startswith("enable_prompt_expansion:")
    assert submit(srv, enhance_prompt="yes").json()["message"].startswith("enhance_prompt:")
    no_prompt = requests.post(srv.url + UNIVERSAL, json={"model": MODEL}, headers=AUTH)
    assert no_prompt.json()["message"].startswith("prompt:")
    assert srv.stats()["rejected_submissions"] == 4


def test_submit_answers_201_universal_and_200_legacy(start_sandbox):
    srv = start_sandbox()
    universal = submit(srv, enhance_prompt=False)
    legacy = submit(srv, LEGACY, enable_prompt_expansion=False)
    assert (universal.status_code, legacy.status_code) == (201, 200)
    for response in (universal, legacy):
        assert response.json() | {"id": None} == {
            "id": None, "status": "queued", "video": None, "error": None, "meta": None}
    entries = requests.get(srv.url + "/__ledger").json()
    assert [e["endpoint"] for e in entries] == ["universal", "legacy"]
    assert entries[1]["body"] == body(enable_prompt_expansion=False)


def test_generations_complete_with_real_mp4_of_requested_size(start_sandbox):
    srv = start_sandbox()
    default_id = submit(srv).json()["id"]
    portrait_id = submit(srv, LEGACY, resolution="480P", aspect_ratio="3:4").json()["id"]
    for gen_id, path in [(default_id, UNIVERSAL), (portrait_id, LEGACY)]:
        assert poll(srv, gen_id, path).json()["status"] in ("queued", "generating")
    for gen_id, path, size in [(default_id, UNIVERSAL, (1280, 720)),
                               (portrait_id, LEGACY, (480, 640))]:
        done, seen = wait_until_done(srv, gen_id, path)
        assert set(seen) <= {"queued", "generating", "completed"}
        assert done["status"] == "completed"
        assert done["meta"] == {"usage": {"credits_used": 120000}} and done["error"] is None
        video = requests.get(done["video"]["url"], timeout=30)
        assert video.status_code == 200 and video.headers["Content-Type"] == "video/mp4"
        assert int(video.headers["Content-Length"]) == len(video.content)
        with av.open(io.BytesIO(video.content)) as container:
            stream = container.streams.video[0]
            assert (stream.width, stream.height) == size
            assert stream.codec_context.name == "h264"
        entry = ledger_entry(srv, gen_id)
        assert entry["sha256"] == hashlib.sha256(video.content).hexdigest()
        assert entry["size"] == len(video.content) and entry["downloads"] == 1
    assert srv.stats()["downloads"] == 2


def test_429_with_retry_after_at_max_concurrency(start_sandbox):
    srv = start_sandbox(time_scale=1.0, max_concurrency=2)
    assert [submit(srv, prompt=f"clip {n}").status_code for n in range(2)] == [201, 201]
    limited = submit(srv, prompt="clip 3")
    assert limited.status_code == 429 and set(limited.json()) == ERROR_KEYS
    # Durations are clipped to [0.5, 1.6] x 90 s, so the earliest ends in that window.
    assert 44 <= int(limited.headers["Retry-After"]) <= 145
    stats = srv.stats()
    assert (stats["rate_limited"], stats["rejected_submissions"]) == (1, 1)
    assert (stats["in_flight"], stats["max_in_flight"], stats["submissions"]) == (2, 2, 2)


def test_429_past_max_submits_in_one_second(start_sandbox):
    """The provider documents 2 submissions per second: the third POST within
    a second is refused, and creates nothing; a second later POSTs go through."""
    srv = start_sandbox(max_concurrency=10, max_submits_per_s=2)
    started = time.monotonic()
    answers = [submit(srv, prompt=f"burst {n}").status_code for n in range(3)]
    assert time.monotonic() - started < 0.9
    assert answers == [201, 201, 429]
    time.sleep(1.05)
    assert submit(srv, prompt="later").status_code == 201
    stats = srv.stats()
    assert (stats["too_fast"], stats["rate_limited"], stats["submissions"]) == (1, 1, 3)


def test_prompt_with_reject_substring_ends_in_error(start_sandbox):
    srv = start_sandbox(reject_substring="FORBIDDEN")
    gen_id = submit(srv, prompt="a FORBIDDEN scene").json()["id"]
    done, _ = wait_until_done(srv, gen_id)
    assert done["status"] == "error" and done["video"] is None
    assert done["error"]["name"] == "ContentPolicyViolation"
    assert done["error"]["message"].startswith("Prompt rejected by content policy")


def test_expired_url_is_403_and_repoll_gives_fresh_url(start_sandbox):
    srv = start_sandbox()
    gen_id = submit(srv).json()["id"]
    old_url = wait_until_done(srv, gen_id)[0]["video"]["url"]
    assert requests.get(old_url).status_code == 200
    assert requests.post(srv.url + "/__expire", json={"id": gen_id}).status_code == 200
    assert requests.get(old_url).status_code == 403
    new_url = poll(srv, gen_id).json()["video"]["url"]
    assert new_url != old_url and requests.get(new_url).status_code == 200
    assert requests.get(new_url.replace("Signature=", "Signature=0")).status_code == 403


def test_url_expires_on_its_own_after_ttl(start_sandbox):
    srv = start_sandbox(url_ttl_s=9.0)  # 0.1 s at 90x; Expires rounds up to a second
    gen_id = submit(srv).json()["id"]
    url = wait_until_done(srv, gen_id)[0]["video"]["url"]
    expires = int(url.split("Expires=")[1].split("&")[0])
    time.sleep(max(0.0, expires - time.time()) + 0.1)
    assert requests.get(url).status_code == 403
    assert requests.get(poll(srv, gen_id).json()["video"]["url"]).status_code == 200


def test_faults_are_served_once_each_then_normal_service(start_sandbox):
    srv = start_sandbox()
    queued = requests.post(srv.url + "/__faults",
                           json={"submit": [503, 429], "poll": [504], "retry_after": 3})
    assert queued.status_code == 200
    unavailable = submit(srv)
    assert unavailable.status_code == 503 and unavailable.text == "<html>Service Unavailable</html>"
    throttled = submit(srv)
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "3"
    accepted = submit(srv)
    assert accepted.status_code == 201
    timed_out = poll(srv, accepted.json()["id"])
    assert timed_out.status_code == 504 and timed_out.json()["statusCode"] == 504
    assert poll(srv, accepted.json()["id"]).status_code == 200
    stats = srv.stats()
    assert (stats["submissions"], stats["rejected_submissions"], stats["polls"]) == (1, 2, 1)
    assert stats["rate_limited"] == 1


def test_a_429_fault_with_retry_after_null_has_no_header(start_sandbox):
    srv = start_sandbox()
    assert requests.post(srv.url + "/__faults",
                         json={"submit": [429], "retry_after": None}).status_code == 200
    throttled = submit(srv)
    assert throttled.status_code == 429 and "Retry-After" not in throttled.headers
    refused = requests.post(srv.url + "/__faults", json={"submit": [429], "retry_after": "x"})
    assert refused.status_code == 400 and "null for none" in refused.text


def test_padded_video_has_exact_size_and_stays_an_mp4(start_sandbox):
    pad_to = 3_000_000
    srv = start_sandbox(pad_video_to=pad_to)
    gen_id = submit(srv, resolution="480P").json()["id"]
    video = requests.get(wait_until_done(srv, gen_id)[0]["video"]["url"], timeout=30)
    assert len(video.content) == pad_to == int(video.headers["Content-Length"])
    assert video.content[4:8] == b"ftyp"
    with av.open(io.BytesIO(video.content)) as container:
        assert container.streams.video[0].width == 854
    assert ledger_entry(srv, gen_id)["size"] == pad_to


def test_stats_count_polls_duplicates_and_reset(start_sandbox):
    srv = start_sandbox(time_scale=1.0)
    prompts = ["dawn", "dawn", "dusk", "dusk", "dusk", "noon"]
    ids = [submit(srv, prompt=p).json()["id"] for p in prompts]
    for gen_id in ids[:3]:
        assert poll(srv, gen_id).json()["status"] == "queued"
    assert poll(srv, "no-such-id").status_code == 404
    assert requests.get(srv.url + "/nowhere").status_code == 404
    assert srv.stats() == requests.get(srv.url + "/__stats").json() == {
        "submissions": 6, "rejected_submissions": 0, "polls": 3, "downloads": 0,
        "max_in_flight": 6, "in_flight": 6, "duplicate_prompts": 2, "rate_limited": 0,
        "too_fast": 0}
    assert [e["polls"] for e in requests.get(srv.url + "/__ledger").json()] == [1, 1, 1, 0, 0, 0]
    requests.post(srv.url + "/__reset")
    assert set(srv.stats().values()) == {0} and requests.get(srv.url + "/__ledger").json() == []


def test_many_concurrent_keep_alive_clients(start_sandbox):
    srv = start_sandbox(time_scale=1.0, max_concurrency=0)  # 0: no concurrency limit

    def client(n):
        with requests.Session() as session:  # one keep-alive connection per client
            return [session.post(srv.url + UNIVERSAL, json=body(f"p{n}-{k}"), headers=AUTH,
                                 timeout=10).status_code for k in range(5)]

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(client, range(32)))
    assert all(codes == [201] * 5 for codes in results)
    assert srv.stats()["max_in_flight"] == 32 * 5


def test_vidq_sandbox_on_a_port_in_use_is_one_error_line(make_sandbox):
    """It was a 39-line traceback and exit 1."""
    import subprocess
    from urllib.parse import urlparse

    taken = urlparse(make_sandbox().url).port
    result = subprocess.run(["vidq", "sandbox", "--port", str(taken)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: --host/--port: cannot listen on 127.0.0.1:{taken}: Address already in use"]
    for option, value in (("--port", "70000"), ("--time-scale", "0")):  # review 96
        refused = subprocess.run(["vidq", "sandbox", option, value], capture_output=True,
                                 text=True, timeout=60)
        assert refused.returncode == 2 and f"Invalid value for '{option}'" in refused.stderr
        assert "Traceback" not in refused.stderr
