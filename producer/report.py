"""`vidq report`: one row per job of a batch, like a batch API's output file.

The rows come from `worker.rows` (the batch manifest in storage holds the
same). A batch that has expired from Redis (see worker/retention.py) is read
back from its manifest in storage.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from worker import manifest
from worker.errors import InputError, VidqError
from worker.jobs import JobStore, State
from worker.rows import COLUMNS, batch_rows, write_csv, write_jsonl
from worker.settings import S3_MIN_PART_BYTES
from worker.storage import open_storage

__all__ = ["COLUMNS", "FORMATS", "check_states", "report_rows", "write_csv", "write_jsonl"]
FORMATS = ("jsonl", "csv")


def check_states(states: Iterable[str]) -> set[str] | None:
    """The `--state` values as State values (None: no filter); an unknown one
    is an InputError."""
    known = [state.value for state in State]
    chosen = set()
    for raw in states:
        value = raw.strip().lower()
        if value not in known:
            raise InputError(f"--state {raw!r} is not a job state: use one of {', '.join(known)}")
        chosen.add(value)
    return chosen or None


def report_rows(store: JobStore | None, batch: str, storage_url: str,
                states: set[str] | None = None) -> Iterator[dict]:
    """One dict per job (keys: COLUMNS), in input-line order, from the
    manifest when there is no `store` (its Redis is gone). Checks the batch
    exists before yielding anything: an unknown batch is an InputError."""
    if store is None or store.batch_total(batch) == 0:
        return _from_manifest(batch, storage_url, states)
    return batch_rows(store.redis, batch, store.job_ids(batch), storage_url, states)


def _from_manifest(batch: str, storage_url: str, states: set[str] | None) -> Iterator[dict]:
    """The rows of a batch that has left Redis, from its manifest in storage."""
    # Only read here: the multipart part size does not matter.
    rows = manifest.read(open_storage(storage_url, S3_MIN_PART_BYTES), batch)
    if rows is None:
        raise InputError(f"no batch named {batch!r}")  # in Redis, nor a manifest in storage
    return iter([row for row in rows if states is None or row.get("state") in states])


def write_report(store: JobStore | None, batch: str, storage_url: str, states: set[str] | None,
                 fmt: str, output: Path | None) -> int:
    """`vidq report`: rows to standard output, or to `output` published whole
    (written beside it, then renamed); returns the rows written."""
    rows = report_rows(store, batch, storage_url, states)
    write = write_csv if fmt == "csv" else write_jsonl
    if output is None:
        try:
            count = write(rows, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:  # `vidq report ... | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            count = 0
        return count
    partial = output.with_name(f".{output.name}.part")
    try:
        with open(partial, "w", encoding="utf-8", newline="") as out:
            count = write(rows, out)
        os.replace(partial, output)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise VidqError(f"cannot write {output}: {exc.strerror or exc}") from None
        raise
    return count
