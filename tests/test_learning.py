"""What the poll plan learns from a completion: once, and never at the job's
expense. Real Redis and the sandbox over HTTP, steps driven by hand."""
from __future__ import annotations

import time

import redis
from test_steps import _admit_one, _run, _until_completed, steps_for  # noqa: F401 - fixture

from worker.keys import durations
from worker.tasks import run_step

SHAPE = durations("alibaba/wan2.1-t2v-turbo", "720P")


def test_a_completion_whose_transition_was_lost_is_learned_once(steps_for):  # noqa: F811
    """Redis drops the connection as the poll that found the video done saves its
    transition: the poll is retried, finds it done again, and the plan holds one
    sample of it, not two."""
    steps = steps_for()
    ref, token = _admit_one(steps)
    real, lost = steps.store.transition, []

    def drops_the_first_download_transition(job, **kwargs):
        if kwargs.get("next_step") == "download" and not lost:
            lost.append(job.ref)
            raise redis.ConnectionError("connection reset by peer")
        return real(job, **kwargs)

    steps.store.transition = drops_the_first_download_transition
    step = "submit"
    while step != "download":  # as the task runs them: an exception is retried
        run_step(steps, step, ref, token)
        step, _, token = steps.sent[-1]
        time.sleep(0.2)
    assert lost == [ref]
    assert steps.store.get(ref).state == "downloading"
    assert steps.store.redis.llen(SHAPE) == 1


def test_a_failure_to_learn_leaves_the_finished_job_on_its_way(steps_for):  # noqa: F811
    """The duration model raises while learning: the job still goes to its download
    with its slot released, and the video is stored."""
    steps = steps_for()
    ref, token = _admit_one(steps)

    def broken(*_args):
        raise ValueError("odd sample")

    steps.durations.record = broken
    token = _until_completed(steps, ref, token)
    assert steps.store.get(ref).state == "downloading"
    assert _run(steps, "download", ref, token).state == "done"
