"""Keep a worker's prefetch count whole when countdown messages meet its
limit (celery 5.7.0 + kombu 5.7.0).

The bug: with `worker_eta_task_limit` set (worker/settings.py: 3C + 16), a
countdown message arriving when the prefetch count is at the limit is not
counted (kombu's `QoS.increment_eventually` clamps at `max_prefetch`), yet
running it later takes a unit off in full (celery's `apply_eta_task`). Each
such message cost the worker one unit of prefetch for good: a worker that met
its limit now and then over a night fetched less and less, until it fetched
one message at a time (review 97 saw it within minutes).

The workaround: the units an increment could not add are owed, and the
decrements that follow pay them off before they lower the count.
"""
from __future__ import annotations

from celery.worker.consumer import tasks as consumer_tasks
from kombu.common import QoS


class OwingQoS(QoS):
    """kombu's QoS, whose clamped increments are owed, not lost."""

    owed = 0

    def increment_eventually(self, n: int = 1) -> int:
        with self._mutex:
            before = self.value
            after = super().increment_eventually(n)
            if before:  # 0: prefetch disabled, nothing counted either way
                self.owed += max(n, 0) - (after - before)
            return after

    def decrement_eventually(self, n: int = 1) -> int:
        with self._mutex:
            paid = min(self.owed, n)
            self.owed -= paid
            return super().decrement_eventually(n - paid) if n > paid else self.value


def install() -> None:
    consumer_tasks.QoS = OwingQoS  # type: ignore[misc]
