"""A small consumer of vidq's event stream (`vidq:events`), to copy from.

It reads with a consumer group, so several copies share the work and a
restarted one resumes where it left off: first the entries it was given
but never acknowledged (its pending entries: it died mid-way), then new
ones. Each event is processed, here appended as one JSON line to --out and
fsynced, and only then acknowledged (XACK). Delivery is at least once: an
event processed just before a crash, and not yet acked, comes again, so
processing must be idempotent (de-duplicate on the event id).

    python examples/events_consumer.py --redis-url redis://127.0.0.1:6379/0 \\
        --group content-pipeline --consumer worker-1 --out events.jsonl

Needs only redis-py. The schema is in README.md ("Events and webhooks").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import redis

STREAM = "vidq:events"


def ensure_group(client: redis.Redis, group: str) -> None:
    """Create the group at the start of the stream (everything still in it)."""
    try:
        client.xgroup_create(STREAM, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def process(event_id: str, fields: dict, out_path: str) -> None:
    """The work: here, one durable line per event. Replace with yours."""
    line = json.dumps({"id": event_id, **fields}, ensure_ascii=False) + "\n"
    with open(out_path, "a", encoding="utf-8") as out:
        out.write(line)
        out.flush()
        os.fsync(out.fileno())


def consume(client: redis.Redis, args: argparse.Namespace) -> int:
    """Process pending entries first, then new ones; returns how many."""
    done, idle_since = 0, time.monotonic()
    # An id: this consumer's pending entries after it (delivered, never
    # acked); ">": entries never delivered to anyone in the group.
    cursor = "0"
    while True:
        pending = cursor != ">"
        answer = client.xreadgroup(args.group, args.consumer, {STREAM: cursor},
                                   count=args.count,
                                   block=None if pending else int(args.block_s * 1000))
        entries = answer[0][1] if answer else []
        if pending:
            cursor = entries[-1][0] if entries else ">"
        elif not entries:
            if args.idle_exit_s and time.monotonic() - idle_since >= args.idle_exit_s:
                return done
            continue
        for event_id, fields in entries:
            if fields:  # empty: trimmed from the stream before it was processed
                process(event_id, fields, args.out)
                time.sleep(args.delay_s)
                done += 1
            client.xack(STREAM, args.group, event_id)
        idle_since = time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default=os.environ.get("VIDQ_REDIS_URL",
                                                              "redis://127.0.0.1:6379/0"))
    parser.add_argument("--group", default="content-pipeline")
    parser.add_argument("--consumer", default="consumer-1")
    parser.add_argument("--out", default="events.jsonl")
    parser.add_argument("--count", type=int, default=100, help="entries per read")
    parser.add_argument("--block-s", type=float, default=1.0, help="wait for new entries")
    parser.add_argument("--delay-s", type=float, default=0.0,
                        help="pause after each event (to watch it work, or kill it mid-way)")
    parser.add_argument("--idle-exit-s", type=float, default=0.0,
                        help="exit after this long without new entries (0: run forever)")
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis_url, decode_responses=True)
    try:
        ensure_group(client, args.group)
        print(f"processed {consume(client, args)} events", flush=True)
    except redis.ConnectionError as exc:
        # One line, not a traceback: the usual cause is the wrong --redis-url
        # (a `vidq run`'s private Redis lives on its own port, while it runs).
        sys.exit(f"error: Redis at --redis-url {args.redis_url}: {exc}")


if __name__ == "__main__":
    main()
