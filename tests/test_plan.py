"""The capacity plan (issue 14, section 5): what a batch will take, before it goes in."""
from __future__ import annotations

import os
import subprocess

import pytest
import redis
from conftest import write_prompts

from producer.plan import capacity_plan, parse_deadline
from worker import keys
from worker.durations import DurationModel
from worker.errors import InputError
from worker.settings import Settings


def vidq(*args, redis_url: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["vidq", *args], env={**os.environ, "VIDQ_REDIS_URL": redis_url, **env},
                          capture_output=True, text=True, timeout=120)


def _requests(n: int, resolution: str = "720P") -> list[dict]:
    return [{"model": "alibaba/wan2.1-t2v-turbo", "prompt": f"p{i}", "resolution": resolution}
            for i in range(n)]


def test_nothing_learned_plans_with_the_configured_guess_and_says_so(redis_url):
    """10,000 videos at C = 2 and 90 s: 10,000 x 90 / (2 x 0.9) s = 5.8 days; 8 h needs
    C >= 10,000 x 90 / (28,800 x 0.9) = 34.7, so 35."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    settings = Settings.from_env({"VIDQ_MAX_IN_FLIGHT": "2"})
    plan = capacity_plan(client, settings, _requests(10_000))
    text = "\n".join(plan.lines(parse_deadline("8h")))
    assert "10,000 videos at C = 2 and ~90 s each: about 5.8 days" in text, text
    assert "configured guess VIDQ_EXPECTED_GENERATION_S, nothing learned yet" in text, text
    assert "to finish in 8 h you need C >= 35" in text, text
    assert "1,200,000,000 credits (120,000 per video, estimated)" in text, text
    assert not plan.meets(8 * 3600)


def test_learned_times_per_resolution_and_the_backlog_ahead_count(redis_url):
    """480P learned at ~10 s, 720P not learned; C from the deployment's config in Redis
    (what workers set), lowered by an effective cap; jobs in flight count as ahead."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    settings = Settings.from_env({"VIDQ_MAX_IN_FLIGHT": "2"})
    model = DurationModel(client, settings.expected_generation_s)
    for done_at in (9.5, 10, 10.5, 10, 9.8, 10.2):
        model.record("alibaba/wan2.1-t2v-turbo", "480P", done_at - 0.5, done_at)
    client.hset(keys.CONFIG, mapping={"max_in_flight": 50, "effective_cap": 40})
    client.zadd(keys.SLOTS, {f"other:{i}": 0 for i in range(30)})

    plan = capacity_plan(client, settings, _requests(100, "480P") + _requests(10))
    text = "\n".join(plan.lines())
    assert plan.cap == 40 and plan.ahead == 30
    assert "alibaba/wan2.1-t2v-turbo 480P (learned)" in text, text
    assert "alibaba/wan2.1-t2v-turbo 720P (configured guess" in text, text
    assert "ahead of it: 30 jobs already waiting or in flight" in text, text
    own = 100 * plan.shapes[0].generation_s + 10 * 90
    assert 9.5 <= plan.shapes[0].generation_s <= 10.5
    assert plan.duration_s() == pytest.approx((own + 30 * own / 110) / (40 * 0.9))


@pytest.mark.parametrize("text,seconds", [("8h", 28800), ("90m", 5400), ("2d", 172800),
                                          ("3600", 3600), ("1.5h", 5400)])
def test_deadlines_in_units(text, seconds):
    assert parse_deadline(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-1h", "0h", "8w"])
def test_a_bad_deadline_is_refused_with_its_value(text):
    with pytest.raises(InputError, match="--deadline"):
        parse_deadline(text)


def test_vidq_plan_prints_the_plan_and_enqueues_nothing(redis_url, tmp_path):
    path = write_prompts(tmp_path / "p.txt", [f"prompt {i}" for i in range(12)])
    result = vidq("plan", str(path), "--deadline", "1h", redis_url=redis_url,
                  VIDQ_MAX_IN_FLIGHT="2")
    assert result.returncode == 0, result.stderr
    assert "plan: 12 videos at C = 2 and ~90 s each: about 10 min" in result.stdout
    assert "to finish in 1 h you need C >= 1" in result.stdout
    assert redis.Redis.from_url(redis_url).keys("vidq:batch*") == []


def test_the_plan_prices_what_the_spend_caps_will_count(redis_url, tmp_path):
    """The producer's shell says 1 credit a video, the workers 120,000: the
    caps count the higher, and so must the plan (it said "about 2 credits"
    for a batch a 150,000 cap then stopped after one video)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.hset(keys.CONFIG, "credit_estimate", "120000.0")  # as a starting worker writes it
    path = write_prompts(tmp_path / "p.txt", ["one", "two"])

    result = vidq("plan", str(path), redis_url=redis_url, VIDQ_CREDIT_ESTIMATE="1")

    assert result.returncode == 0, result.stderr
    assert "spend: about 240,000 credits (120,000 per video, estimated)" in result.stdout


def test_enqueue_with_a_deadline_it_cannot_meet_refuses_unless_forced(redis_url, tmp_path):
    """240 videos x 90 s at C = 2 take ~3.3 h: a 1 h deadline is refused (exit 2,
    nothing enqueued, the C it would need named); --force enqueues anyway."""
    path = write_prompts(tmp_path / "p.txt", [f"prompt {i}" for i in range(240)])
    refused = vidq("enqueue", str(path), "--batch", "night", "--deadline", "1h",
                   redis_url=redis_url, VIDQ_MAX_IN_FLIGHT="2")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "cannot finish in 1 h" in refused.stderr and "C >= 7" in refused.stderr
    assert redis.Redis.from_url(redis_url).keys("vidq:batch*") == []

    forced = vidq("enqueue", str(path), "--batch", "night", "--deadline", "1h", "--force",
                  redis_url=redis_url, VIDQ_MAX_IN_FLIGHT="2")
    assert forced.returncode == 0, forced.stderr
    assert "plan: 240 videos at C = 2" in forced.stdout
    assert "batch night: 240 jobs (240 new" in forced.stdout


def test_enqueue_warns_of_a_credit_cap_below_one_video(redis_url, tmp_path):
    """--max-credits 100000 with 120,000 a video: the plan said "2 videos ...
    about 3 s" and nothing ever ran."""
    path = write_prompts(tmp_path / "p.txt", ["one", "two"])
    capped = vidq("enqueue", str(path), "--batch", "capped", "--max-credits", "100000",
                  redis_url=redis_url, VIDQ_CREDIT_ESTIMATE="120000")
    assert capped.returncode == 0, capped.stderr
    assert ("warning: --max-credits 100,000.00 is below one new video's estimate "
            "(120,000.00): the batch stops at that job for good") in capped.stdout
    enough = vidq("enqueue", str(path), "--batch", "enough", "--max-credits", "120000",
                  redis_url=redis_url, VIDQ_CREDIT_ESTIMATE="120000")
    assert enough.returncode == 0 and "warning" not in enough.stdout + enough.stderr
    # Admitted in line order: a 720P job that never fits stops the 480P one
    # behind it, though that one alone would fit (review 96).
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "big first", "resolution": "720P"}\n'
                     '{"prompt": "small second", "resolution": "480P"}\n')
    stopped = vidq("enqueue", str(mixed), "--batch", "mixed", "--max-credits", "150000",
                   redis_url=redis_url, VIDQ_CREDIT_ESTIMATES="alibaba/wan2.1-t2v-turbo@720P=200000",
                   VIDQ_CREDIT_ESTIMATE="120000")
    assert "below one new video's estimate (200,000.00)" in stopped.stdout
