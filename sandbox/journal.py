"""The generations a sandbox created, kept in a file so a restarted sandbox
still knows them: `vidq run --sandbox` interrupted and run again starts a new
sandbox, and the generations its first run paid for (in play money) must
still answer their polls, as the real API's would, not 404 for 24 hours.
One JSON line per generation, appended as it is created.
"""
from __future__ import annotations

import json
from pathlib import Path

FIELDS = ("id", "prompt", "body", "endpoint", "width", "height", "submitted_at",
          "completes_at", "rejected", "failed_status")


def append(path: Path, generation) -> None:
    record = {name: getattr(generation, name) for name in FIELDS}
    with path.open("a", encoding="utf-8") as journal:
        journal.write(json.dumps(record) + "\n")


def load(path: Path) -> list[dict]:
    """The generations recorded in `path` (none if it does not exist); a line
    cut short by a crash is skipped, and ended so the next one is not joined
    to it."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        with path.open("a", encoding="utf-8") as journal:
            journal.write("\n")
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and set(FIELDS) <= set(record):
            records.append({name: record[name] for name in FIELDS})
    return records
