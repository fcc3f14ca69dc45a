"""What an enqueue or a batch command says when its batch changed under it
(a purge, a cancel, another producer), and the interrupt that says how much
an enqueue had written."""
from __future__ import annotations

from .errors import InputError


def being_purged(batch: str, what: str) -> str:
    return (f"batch {batch!r} is being purged (removed from Redis): {what}; if that purge "
            f"stopped half-way, `vidq purge {batch}` finishes it (with --force if it was "
            "forced)")


class EnqueueInterrupted(KeyboardInterrupt):
    """A stop signal while an enqueue wrote its jobs: at least `created`
    were written (a pipeline cut short may have written more) and will run."""

    def __init__(self, batch: str, created: int):
        super().__init__(batch, created)
        self.batch, self.created = batch, created


def purged_meanwhile(batch: str, what: str) -> InputError:
    return InputError(f"no batch named {batch!r} any more (purged meanwhile): {what}")


def lock_lapsed(batch: str, created: int) -> InputError:
    return InputError(
        f"batch {batch!r}: this enqueue lost its lock (the process stood still past its "
        f"time, stopped or suspended, or Redis was out of reach or restarted without it) "
        f"and another enqueue may have changed the batch since; {created} new jobs had "
        "been written, the rest were not; the same command again checks the batch afresh "
        "and enqueues the rest (nothing twice)")


def purged_while_enqueued(batch: str, created: int, refused: int) -> InputError:
    return InputError(f"batch {batch!r} was purged while this enqueue ran: {created} jobs "
                      f"were written before (purged with it unless admitted already), "
                      f"{refused} were not enqueued; the same command again enqueues them "
                      "into a new batch of the name")
