"""A paid generation the upstream answers 404 for. Held to the 24 h hard
limit, its slot stalled a batch (two such ids at the provider's C = 2); freed
on one 404, it passed C when the 404 was a hiccup. Only "not found" again and
again gives the slot up, an older running job keeps it, and an id that
answers again takes a slot back. Real Redis, the sandbox over HTTP, real
workers where the batch must go on."""
from __future__ import annotations

import hashlib
import time

import requests
from conftest import wait_until, write_prompts
from test_steps import _admit_one, _run, steps_for  # noqa: F401 - fixture

from worker import keys
from worker.tasks import run_step


def _forget(sandbox, generation_id: str) -> None:
    requests.post(sandbox.url + "/__forget", json={"id": generation_id},
                  timeout=10).raise_for_status()


def test_a_generation_the_upstream_lost_gives_its_slot_to_the_next_job(make_pipeline,
                                                                       make_sandbox, tmp_path):
    """C = 1. The upstream loses the first job's generation (404 from then on,
    no longer running). The second job waited for the slot until the hard
    limit; now it runs once the 404s have lasted, never above the cap."""
    sandbox = make_sandbox(time_scale=1, mean_generation_s=3, spread=0, max_concurrency=1)
    pipeline = make_pipeline(sandbox, VIDQ_MAX_IN_FLIGHT=1, VIDQ_EXPECTED_GENERATION_S=3,
                             VIDQ_DEADLINE_S=4, VIDQ_HARD_LIMIT_S=600)
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", ["lost upstream", "waits its turn"]),
                     "lost")
    wait_until(lambda: len(pipeline.ledger()) == 1, 30, "the first POST")
    [lost] = pipeline.ledger()
    _forget(sandbox, lost["id"])

    wait_until(lambda: pipeline.store.counts("lost")["done"] == 1, 60, "the second video")

    posted = {entry["prompt"]: entry for entry in pipeline.ledger()}
    assert set(posted) == {"lost upstream", "waits its turn"}
    kept = posted["waits its turn"]
    [video] = (tmp_path / "videos" / "lost").glob("*.mp4")
    assert hashlib.sha256(video.read_bytes()).hexdigest() == kept["sha256"]
    stats = sandbox.stats()
    assert stats["rate_limited"] == 0 and stats["max_in_flight"] == 1, stats
    log = (pipeline.log_dir / "worker-0.log").read_text()
    assert f"the upstream has not known generation {lost['id']} for" in log


def test_404s_that_do_not_last_keep_the_slot_and_an_id_that_answers_again_takes_it_back(
        steps_for, make_sandbox):  # noqa: F811
    """Two 404s, then the generation answers: the slot never moved. Three
    404s over the backoff cap: the slot is given up as a hold, which an older
    job still running keeps; once that one is done it is freed, and the id
    answering "generating" again takes a slot back."""
    sandbox = make_sandbox(time_scale=1, mean_generation_s=60, spread=0)
    steps = steps_for(sandbox, VIDQ_DEADLINE_S="0.5", VIDQ_BACKOFF_BASE_S="0.1",
                      VIDQ_BACKOFF_CAP_S="0.5")
    older_ref, older_token = _admit_one(steps, "an older job", "older")
    _run(steps, "submit", older_ref, older_token)
    ref, token = _admit_one(steps)
    _run(steps, "submit", ref, token)
    redis = steps.store.redis

    def polls(count: int) -> None:
        for _ in range(count):
            _, _, next_token = steps.sent[-1]
            run_step(steps, "poll", ref, next_token)  # as the task does: errors handled
            time.sleep(0.3)

    time.sleep(0.6)  # past the deadline, the hold age with nothing learned
    sandbox_faults = sandbox.url + "/__faults"
    requests.post(sandbox_faults, json={"poll": [404, 404]}, timeout=10).raise_for_status()
    polls(3)
    assert redis.zscore(keys.SLOT_HOLDS, ref) is None and redis.zscore(keys.SLOTS, ref)
    assert not redis.hget(keys.job(ref), "not_found")

    requests.post(sandbox_faults, json={"poll": [404] * 3}, timeout=10).raise_for_status()
    polls(3)
    assert redis.hget(keys.job(ref), "slot_given_up") == "1"
    assert redis.zscore(keys.SLOT_HOLDS, ref) is not None
    # The guard lasts VIDQ_DEADLINE_S from the slot's taking: in production
    # (1,000 s) far past the age a slot is given up at; here 0.5 s, too short.
    steps.admission.longest_hold_s = 60.0
    steps.admission.release_expired_holds(recheck_s=0.01)
    assert redis.zscore(keys.SLOTS, ref), "freed while an older job still runs"

    redis.zrem(keys.SLOTS, older_ref)  # the older job is done
    time.sleep(0.05)
    assert steps.admission.release_expired_holds(recheck_s=0.01) == 1
    assert redis.zscore(keys.SLOTS, ref) is None

    polls(1)  # "generating": the upstream runs it after all
    assert redis.zscore(keys.SLOTS, ref) and redis.zscore(keys.SLOT_HOLDS, ref) is None
    assert not redis.hget(keys.job(ref), "slot_given_up")
