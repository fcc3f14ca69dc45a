"""The whole chain through real Celery workers, Redis and the sandbox."""
from __future__ import annotations

import hashlib
import json

import pytest
from conftest import write_prompts

from worker.keys import job_ref
from worker.tasks import dispatch


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_batch_of_24_lands_every_video_checked(make_pipeline, tmp_path):
    """24 prompts end done; each file is an MP4 whose size and sha256 match the sandbox."""
    pipeline = make_pipeline()
    pipeline.start_workers(count=1, concurrency=4)
    prompts = [f"A lighthouse in storm number {i}" for i in range(24)]
    result = pipeline.enqueue(write_prompts(tmp_path / "p.txt", prompts), "b24")
    assert (result.created, result.jobs_in_file) == (24, 24)

    counts = pipeline.wait_finished("b24", timeout_s=120)

    assert counts["done"] == 24 and counts["failed"] == 0
    served = {entry["id"]: entry for entry in pipeline.ledger()}
    assert len(served) == 24
    videos = tmp_path / "videos" / "b24"
    for job_id in pipeline.store.job_ids("b24"):
        sidecar = json.loads((videos / f"{job_id}.json").read_text())
        video = videos / f"{job_id}.mp4"
        entry = served[sidecar["generation_id"]]
        assert video.read_bytes()[4:8] == b"ftyp"
        assert video.stat().st_size == sidecar["bytes"] == entry["size"]
        assert _sha256(video) == sidecar["sha256"] == entry["sha256"]
        assert sidecar["prompt"] == entry["prompt"]
    assert pipeline.sandbox.stats()["duplicate_prompts"] == 0
    key = pipeline.sandbox.config.api_key
    for log in pipeline.log_dir.glob("*.log"):
        assert key not in log.read_text(errors="replace")


def test_redelivered_submit_never_posts_twice(make_pipeline, tmp_path):
    """A submit for a job that has a generation id polls it instead of paying again."""
    pipeline = make_pipeline()
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["one red balloon"]), "redeliver")
    pipeline.wait_finished("redeliver")
    (job_id,) = pipeline.store.job_ids("redeliver")
    ref = job_ref("redeliver", job_id)
    job = pipeline.store.get(ref)
    # As if the worker died after recording the id but before scheduling the poll.
    token = pipeline.store.transition(job, state="submitted", next_step="submit",
                                      due_at=0, expected_token="*")
    dispatch("submit", ref, token, 0)
    dispatch("submit", ref, token, 0)  # and the same message delivered twice

    counts = pipeline.wait_finished("redeliver")

    assert counts == {**counts, "done": 1, "failed": 0}
    stats = pipeline.sandbox.stats()
    assert stats["submissions"] == 1
    assert pipeline.store.get(ref).generation_id == job.generation_id


def test_generation_error_fails_job_with_upstream_message(make_pipeline, tmp_path):
    """A generation that ends in `error` fails its job with the upstream's words."""
    pipeline = make_pipeline()
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["fine prompt", "please REJECT me"]), "err")

    counts = pipeline.wait_finished("err")

    assert (counts["done"], counts["failed"]) == (1, 1)
    failed = [pipeline.store.get(job_ref("err", i)) for i in pipeline.store.job_ids("err")]
    failed = [job for job in failed if job.state == "failed"][0]
    assert "Prompt rejected by content policy" in failed.last_error
    assert failed.generation_id  # kept: the generation was paid for


@pytest.mark.parametrize("word", ["failed", "cancelled"])
def test_a_generation_ended_in_another_failure_word_frees_its_slot(make_pipeline, make_sandbox,
                                                                   tmp_path, word):
    """Other models answer `failed`, and an upstream may name a generation it
    gave up on in its own words: read as pending, it would hold its slot until
    the hard limit (24 h). With C = 1 the next prompt runs only once it is freed."""
    sandbox = make_sandbox(failed_status=word)
    pipeline = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT=1)
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["please REJECT me", "fine prompt"]), "w")

    counts = pipeline.wait_finished("w", timeout_s=60)

    assert (counts["done"], counts["failed"]) == (1, 1)
    failed = [job for job in (pipeline.store.get(job_ref("w", i))
                              for i in pipeline.store.job_ids("w")) if job.state == "failed"]
    assert "Prompt rejected by content policy" in failed[0].last_error
    assert sandbox.stats()["submissions"] == 2  # each prompt POSTed once


def test_429_and_503_are_retried_to_success(make_pipeline, tmp_path):
    """Rate limiting (with Retry-After) and a proxy's 503 are retried until done."""
    pipeline = make_pipeline()
    pipeline.faults(submit=[429, 503], poll=[503, 429], retry_after=1)
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["a slow snail"]), "retry")

    counts = pipeline.wait_finished("retry")

    assert counts["done"] == 1
    stats = pipeline.sandbox.stats()
    assert stats["submissions"] == 1 and stats["rate_limited"] >= 1


def test_legacy_endpoint_names_the_expansion_flag(make_pipeline, tmp_path):
    """VIDQ_ENDPOINT=legacy posts to the legacy path with enable_prompt_expansion."""
    pipeline = make_pipeline(VIDQ_ENDPOINT="legacy")
    pipeline.start_workers()
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a quiet harbour", "enhance_prompt": False,
                                "resolution": "480P", "aspect_ratio": "1:1"}) + "\n")
    pipeline.enqueue(path, "legacy")

    counts = pipeline.wait_finished("legacy")

    assert counts["done"] == 1
    (entry,) = pipeline.ledger()
    assert entry["endpoint"] == "legacy"
    assert entry["body"]["enable_prompt_expansion"] is False
    assert "enhance_prompt" not in entry["body"]
