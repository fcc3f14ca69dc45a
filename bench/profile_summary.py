"""Where the CPU goes in a benchmark run, from py-spy's collapsed stacks.

    py-spy record --subprocesses --full-filenames --format raw -r 50 -o /tmp/vidq.prof \\
        -- python -m bench.run --only vidq --n 1000 --c 50
    python -m bench.profile_summary /tmp/vidq.prof [--top 15]

Prints the share of samples per process kind (worker, sandbox/bench, ...), then the
functions with the most samples of their own (the leaf of each stack) and the vidq
and library frames with the most samples anywhere on the stack (inclusive).
"""
from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:]+)(?::\d+)?\)$")
AREAS = (("celery", "/celery/"), ("kombu", "/kombu/"), ("redis-py", "/redis/"),
         ("billiard", "/billiard/"), ("requests/urllib3", "/urllib3/"),
         ("requests/urllib3", "/requests/"), ("vidq worker", "/worker/"),
         ("sandbox", "/sandbox/"), ("bench", "/bench/"), ("json", "/json/"))


def parse(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def area(frame: str) -> str:
    match = FRAME.match(frame)
    file = match.group("file") if match else frame
    return next((name for name, marker in AREAS if marker in file), "other")


def summarize(stacks: list[tuple[list[str], int]], top: int) -> list[str]:
    total = sum(count for _, count in stacks) or 1
    by_process: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    areas: collections.Counter = collections.Counter()
    for frames, count in stacks:
        processes = [frame for frame in frames if frame.startswith("process ")] or frames[:1]
        by_process[_process_kind(processes[-1])] += count
        leaf = frames[-1]
        own[leaf] += count
        areas[area(leaf)] += count
        for frame in set(frames[1:]):
            if "/worker/" in frame or "/kombu/" in frame or "/celery/" in frame:
                inclusive[frame] += count
    lines = [f"samples: {total:,}", "by process:"]
    lines += [f"  {share(n, total)}  {kind}" for kind, n in by_process.most_common()]
    lines += ["own time by area (leaf frame):"]
    lines += [f"  {share(n, total)}  {name}" for name, n in areas.most_common()]
    lines += [f"top {top} functions, own time:"]
    lines += [f"  {share(n, total)}  {frame}" for frame, n in own.most_common(top)]
    lines += [f"top {top} vidq/celery/kombu frames, inclusive:"]
    lines += [f"  {share(n, total)}  {frame}" for frame, n in inclusive.most_common(top)]
    return lines


def share(count: int, total: int) -> str:
    return f"{100 * count / total:5.1f}%"


def _process_kind(root: str) -> str:
    """py-spy nests a child's stacks under its parent's: the innermost process
    frame names the process."""
    text = root.lower()
    for kind in ("celery", "redis-server", "bench", "enqueue_probe"):
        if kind in text:
            return kind
    return root[:60]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_summary", description=__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    print("\n".join(summarize(parse(args.path), args.top)))


if __name__ == "__main__":
    main()
