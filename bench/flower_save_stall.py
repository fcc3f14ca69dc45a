"""How long one Flower state save blocks Flower's event loop:
`python -m bench.flower_save_stall [--tasks 30000] [--rounds 3]`.

Builds Flower's own event state (flower.events.EventsState) holding N
finished vidq-like tasks, then times Flower's save (`Events.save_state`, run
on the event loop as Flower does) against vidq's forked save
(worker/flower_save.py: the loop only pays for the fork), and checks that the
child's file loads back with every task. Light: no Redis, no workers.
"""
from __future__ import annotations

import argparse
import shelve
import sys
import tempfile
import time
import types
import uuid

from flower.events import Events, EventsState

from worker import flower_save


def build_state(count: int) -> EventsState:
    state = EventsState(max_tasks_in_memory=count)
    now = time.time()
    for i in range(count):
        task_id, ref = str(uuid.uuid4()), f"night-1:p-{i:08x}deadbeefcafe1234"
        common = {"hostname": "vidq1@host", "timestamp": now, "local_received": now,
                  "utcoffset": 0, "pid": 1, "uuid": task_id}
        state.event({**common, "type": "task-received", "name": "vidq.poll", "clock": 3 * i,
                     "args": repr((ref, str(i))), "kwargs": "{}", "eta": None, "retries": 0,
                     "root_id": task_id, "parent_id": None})
        state.event({**common, "type": "task-started", "clock": 3 * i + 1})
        state.event({**common, "type": "task-succeeded", "clock": 3 * i + 2, "runtime": 0.01,
                     "result": repr(f"{ref} poll in 84 s | batch 3,412/10,000 done, "
                                    "41 failed, 6,412 waiting")})
    return state


def measure(count: int, rounds: int) -> dict:
    state = build_state(count)
    events = types.SimpleNamespace(state=state, state_save_interval=60_000, state_save_timer=None,
                                   db=tempfile.mkdtemp(prefix="flower-save-") + "/flower.db")
    events.save_state = lambda: Events.save_state(events)
    in_loop, forked, child = [], [], []
    for _ in range(rounds):
        began = time.monotonic()
        events.save_state()
        in_loop.append(time.monotonic() - began)
        began = time.monotonic()
        flower_save.save_in_child(events)
        forked.append(time.monotonic() - began)
        flower_save.wait_for_child(events)
        child.append(time.monotonic() - began)
    with shelve.open(events.db, flag="r") as saved:
        reloaded = len(saved["events"].tasks)
    return {"tasks": count, "reloaded": reloaded,
            "in_loop_s": [round(v, 3) for v in in_loop],
            "forked_loop_ms": [round(v * 1000, 1) for v in forked],
            "child_write_s": [round(v, 2) for v in child]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flower_save_stall",
                                     description=__doc__)
    parser.add_argument("--tasks", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    result = measure(args.tasks, args.rounds)
    print(f"{result['tasks']:,} tasks: a save blocks Flower's event loop "
          f"{result['in_loop_s']} s on the loop, {result['forked_loop_ms']} ms forked "
          f"(the child writes in {result['child_write_s']} s; {result['reloaded']:,} "
          "tasks load back)")
    return 0 if result["reloaded"] == result["tasks"] else 1


if __name__ == "__main__":
    sys.exit(main())
