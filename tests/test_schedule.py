"""Poll timing, backoff and settings: small rules that shape a whole night."""
from __future__ import annotations

import pytest
import redis

from worker.errors import ConfigError
from worker.schedule import DurationModel, backoff_delay, first_poll_delay, next_poll_delay
from worker.settings import Settings


def test_backoff_grows_exponentially_and_is_capped():
    """Each retry waits longer, between half and all of its ceiling, never above the cap."""
    for attempt, ceiling in ((1, 2), (2, 4), (3, 8), (10, 30)):
        delays = [backoff_delay(attempt, 2, 30) for _ in range(200)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling


def test_first_poll_is_aimed_at_the_expected_time_within_bounds():
    """The first poll waits about the expected time, clamped to the poll bounds."""
    assert 83 <= first_poll_delay(90, 2, 120) <= 88
    assert first_poll_delay(90, 2, 60) == 60
    assert first_poll_delay(0.01, 2, 60) == 2


def test_later_polls_are_short_and_growing():
    """The second poll lands just after the median; later ones every ~5% of it, growing."""
    assert next_poll_delay(90, 1, 0.1, 120, elapsed_s=85.5) == pytest.approx(7.2)
    third = next_poll_delay(90, 2, 0.1, 120, elapsed_s=93)
    fifth = next_poll_delay(90, 4, 0.1, 120, elapsed_s=105)
    assert 4 <= third <= 5 and fifth > third
    assert next_poll_delay(90, 1, 0.1, 60, elapsed_s=60) == pytest.approx(25.5)


def test_duration_model_learns_the_median(redis_url):
    """After a few completions the expected time is their median, per model and size."""
    model = DurationModel(redis.Redis.from_url(redis_url, decode_responses=True), 90)
    assert model.expected_s("m", "720P") == 90
    for elapsed in (40, 42, 44, 46, 48):
        model.record("m", "480P", elapsed, polls=3, last_interval_s=4)
    assert model.expected_s("m", "480P") == 42  # 44 minus half the last interval
    assert model.expected_s("m", "720P") == 90


def test_settings_name_the_bad_variable():
    """A malformed or contradictory setting is refused with its variable's name."""
    with pytest.raises(ConfigError, match="VIDQ_MAX_IN_FLIGHT"):
        Settings.from_env({"VIDQ_MAX_IN_FLIGHT": "lots"})
    with pytest.raises(ConfigError, match="VIDQ_ENDPOINT"):
        Settings.from_env({"VIDQ_ENDPOINT": "v3"})
    with pytest.raises(ConfigError, match="VIDQ_VISIBILITY_TIMEOUT_S"):
        Settings.from_env({"VIDQ_VISIBILITY_TIMEOUT_S": "100"})
    assert Settings.from_env({"AIML_API_KEY": "k"}).api_key == "k"
    assert "sk-hidden" not in repr(Settings.from_env({"AIMLAPI_KEY": "sk-hidden"}))
