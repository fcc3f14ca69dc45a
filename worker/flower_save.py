"""Flower's periodic state save, moved off its event loop.

With `--persistent`, Flower pickles its whole task window on its only event
loop thread, so no page answers until the save ends: bench.flower_sizing
measured stalls of 1 to 6 s each minute for a 30,000-task window on this
2-core machine under load. Here each periodic save runs in a forked child,
as Redis's BGSAVE does: the child holds a copy-on-write snapshot of the state
as it is between two events, writes it with Flower's own `save_state`
(temporary file, then rename) and exits; the event loop pays only for the
fork. A save still running when the next is due makes that one skip; one
running longer than SAVE_TIMEOUT_S hangs (a stalled disk, a stopped process)
and is killed, so the next save starts fresh (the saved db is only replaced by
a finished save). The save at shutdown stays Flower's own, synchronous, after
the running child finishes or, past STOP_WAIT_S, is killed: a hung child must
not keep Flower from its final save within its grace period (compose 45 s,
Kubernetes 60 s).

Safe to fork here: the state is only touched on the event loop thread (the
events thread hands each event over with `add_callback`), and the fork
happens on that thread between two callbacks, so no lock on the state is
held; the child never returns into Flower (`os._exit`).

Loaded by Flower's configuration file, `worker/flowerconfig.py`.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from typing import Any

log = logging.getLogger(__name__)

# Saves of a 30,000-task window took 7 to 8 s on a loaded 2-core machine.
SAVE_TIMEOUT_S = 300.0
STOP_WAIT_S = 15.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def install() -> None:
    """Make Flower's periodic saves run in a child process (idempotent)."""
    from flower.events import Events
    from tornado.ioloop import PeriodicCallback

    if getattr(Events.start, "vidq_background_save", False):
        return
    original_start, original_stop = Events.start, Events.stop

    def start(self) -> None:
        if getattr(self, "state_save_timer", None) is not None:
            self.state_save_timer = PeriodicCallback(lambda: save_in_child(self),
                                                     self.state_save_interval)
        original_start(self)

    def stop(self) -> None:
        wait_for_child(self)
        original_stop(self)

    start.vidq_background_save = True  # type: ignore[attr-defined]
    Events.start, Events.stop = start, stop


def save_in_child(events: Any) -> None:
    """Fork a child that saves `events.state` (its pid kept in `vidq_save_child`)."""
    if _child_running(events):
        log.warning("previous state save still running: this one is skipped")
        return
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: save, then leave without running Flower's atexit hooks
        code = 1
        try:
            _die_with(parent)
            events.save_state()
            code = 0
        finally:
            os._exit(code)
    events.vidq_save_child, events.vidq_save_started = pid, time.monotonic()


def _die_with(parent: int) -> None:
    """The child inherits Flower's listening socket: one that outlived a killed Flower
    would hold its port, and a Flower restarted on that port would fail to start, as
    long as the save runs (forever, if it hangs). So it dies with Flower (Linux); the db
    keeps the previous save, as after any crash."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # Flower died before the line above
        os._exit(1)


def _child_running(events: Any) -> bool:
    pid = getattr(events, "vidq_save_child", None)
    if pid is None or _reaped(events, pid):
        return False
    if time.monotonic() - events.vidq_save_started < SAVE_TIMEOUT_S:
        return True
    log.error("state save in child %s still running after %.0f s: killed", pid, SAVE_TIMEOUT_S)
    _kill(events, pid)
    return False


def wait_for_child(events: Any) -> None:
    """Let a running save finish, for up to STOP_WAIT_S; then kill it."""
    pid = getattr(events, "vidq_save_child", None)
    if pid is None:
        return
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline:
        if _reaped(events, pid):
            return
        time.sleep(0.05)
    log.error("state save in child %s still running at shutdown: killed", pid)
    _kill(events, pid)


def _reaped(events: Any, pid: int) -> bool:
    """Whether the child has ended (then reaped, so no zombie stays)."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        done, status = pid, 0
    if done == 0:
        return False
    events.vidq_save_child = None
    if status:
        log.error("state save in child %s failed (wait status %s)", pid, status)
    return True


def _kill(events: Any, pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    events.vidq_save_child = None
