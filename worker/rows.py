"""One row per job of a batch, like a batch API's output file: what
`vidq report` prints and what the batch manifest in storage holds.

Rows are read `CHUNK` jobs per round trip and yielded as they are read, so a
100,000-job batch is a few dozen round trips and its rows are never all held
in memory. A first, light pass reads every job's input line and state (to
filter on states and to order rows by input line); the second reads the
selected jobs' hashes, chunk by chunk. Each round trip is one read-only
script answering one JSON string: redis-py's reply parser (pure Python
without hiredis) costs far more per reply element than json.loads.

A job's generation ids are every id it ever had: those `vidq retry
--resubmit` retired (`past_generations`), its own, then its siblings'. A
second generation id that answered for one job (an old POST answering after
a resubmit) becomes a sibling job `<id>~N` of its own (see
lua/record_generation.lua): a sibling's row names its job (`sibling_of`) and
carries that job's input line.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import redis

from . import keys
from .contract import DEFAULT_PARAMETERS

CHUNK = 5000
# A job's input line, and the prompt file it came from, as given to the enqueue
# (a batch may be enqueued from several files).
Origin = tuple[int | None, str | None]
TIMINGS = ("enqueued_at", "submitted_at", "completed_at", "downloaded_at", "failed_at")
COLUMNS = ("custom_id", "line", "file", "prompt", "model", "parameters", "state", "storage_url",
           "sha256", "generation_id", "generation_ids", "siblings", "sibling_of",
           "credits_used", "credits", *TIMINGS, "attempts", "polls", "error",
           "outcome_unknown")

# Every KEYS[i]'s hash as a JSON object ({} if the job is gone), in one string.
_READ_HASHES = """
local out = {}
for i, key in ipairs(KEYS) do
  local flat, record = redis.call('HGETALL', key), {}
  for j = 1, #flat, 2 do record[flat[j]] = flat[j + 1] end
  out[i] = record
end
return cjson.encode(out)
"""
# [line, state] of every KEYS[i] (false where unset), in one string.
_READ_LINES = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('HMGET', key, 'line', 'state', 'file')
end
return cjson.encode(out)
"""


def effective_parameters(request: dict) -> dict:
    """The request's parameters with the upstream's defaults filled in
    (without prompt and model)."""
    parameters = {**DEFAULT_PARAMETERS, **request}
    parameters.pop("prompt", None)
    parameters.pop("model", None)
    return parameters


def storage_base(storage_url: str) -> str:
    """VIDQ_STORAGE_URL as a URL prefix for keys (a plain path becomes file://)."""
    if urlparse(storage_url).scheme:
        return storage_url.rstrip("/")
    return Path(storage_url).expanduser().resolve().as_uri()


def batch_rows(client: redis.Redis, batch: str, job_ids: list[str], storage_url: str,
               states: set[str] | None = None) -> Iterator[dict]:
    """One dict per job (keys: COLUMNS), in input-line order."""
    return _rows(client, batch, storage_base(storage_url),
                 _selected(client, batch, job_ids, states))


def _rows(client: redis.Redis, batch: str, base: str,
          selected: list[tuple[str, Origin]]) -> Iterator[dict]:
    read = client.register_script(_READ_HASHES)
    for start in range(0, len(selected), CHUNK):
        chunk = selected[start:start + CHUNK]
        answer = read([keys.job(keys.job_ref(batch, job_id)) for job_id, _ in chunk])
        found = [(data, origin) for (_, origin), data in zip(chunk, _objects(answer),
                                                               strict=True) if data]
        siblings = _sibling_generations(client, batch, [data for data, _ in found])
        for data, origin in found:
            yield _row(data, origin, base, siblings)


def _selected(client: redis.Redis, batch: str, job_ids: list[str],
              states: set[str] | None) -> list[tuple[str, Origin]]:
    """(job id, its input line and file) of the jobs to report, ordered by line
    then id. A sibling `<id>~N` has no line of its own: it takes its job's."""
    read = client.register_script(_READ_LINES)
    found: dict[str, Origin] = {}
    for start in range(0, len(job_ids), CHUNK):
        chunk = job_ids[start:start + CHUNK]
        answer = read([keys.job(keys.job_ref(batch, job_id)) for job_id in chunk])
        for job_id, (line, state, file) in zip(chunk, json.loads(answer), strict=True):
            if states is None or state in states:
                found[job_id] = (_int(line or None), file or None)
    orphans = [job_id for job_id, (line, _) in found.items() if line is None and "~" in job_id]
    for start in range(0, len(orphans), CHUNK):  # siblings (rare): their job's line
        chunk = orphans[start:start + CHUNK]
        pipe = client.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hmget(keys.job(keys.job_ref(batch, _parent(job_id))), "line", "file")
        for job_id, (line, file) in zip(chunk, pipe.execute(), strict=True):
            found[job_id] = (_int(line), file)
    return sorted(found.items(),
                  key=lambda item: (item[1][0] is None, item[1][0] or 0, item[0]))


def _objects(answer: str) -> list[dict]:
    # cjson writes an empty table (a job that is gone) as {}, and an empty
    # list as {} too: an empty chunk never reaches here.
    return [data if isinstance(data, dict) else {} for data in json.loads(answer)]


def _parent(job_id: str) -> str:
    return job_id.rsplit("~", 1)[0]


def _sibling_ids(data: dict) -> list[str]:
    extra = _int(data.get("extra_generations")) or 0
    return [f"{data['id']}~{n}" for n in range(2, extra + 2)]


def _sibling_generations(client: redis.Redis, batch: str, hashes: list[dict]) -> dict[str, str]:
    """sibling id -> its generation id, for the siblings of these jobs (one round trip)."""
    wanted = [sibling for data in hashes for sibling in _sibling_ids(data)]
    if not wanted:
        return {}
    pipe = client.pipeline(transaction=False)
    for sibling in wanted:
        pipe.hget(keys.job(keys.job_ref(batch, sibling)), "generation_id")
    return {sibling: gen or "" for sibling, gen in zip(wanted, pipe.execute(), strict=True)}


def _past_generations(data: dict) -> list[str]:
    try:
        past = json.loads(data.get("past_generations") or "[]")
    except ValueError:
        return []
    return [str(gen) for gen in past] if isinstance(past, list) else []


def _row(data: dict, origin: Origin, base: str, siblings: dict[str, str]) -> dict:
    try:
        request = json.loads(data.get("request") or "{}")
    except ValueError:
        request = {}
    own = data.get("generation_id") or ""
    sibling_ids = _sibling_ids(data)
    # (A retired generation that finished after all is its own again: once.)
    generation_ids = list(dict.fromkeys(
        gen for gen in [*_past_generations(data), own,
                        *(siblings.get(s, "") for s in sibling_ids)] if gen))
    storage_key = data.get("storage_key") or ""
    job_id = data["id"]
    row = {
        "custom_id": job_id, "line": origin[0], "file": origin[1],
        "prompt": request.get("prompt"),
        "model": request.get("model"), "parameters": effective_parameters(request),
        "state": data.get("state"),
        # Where the worker that stored it put it (workers may disagree on
        # VIDQ_STORAGE_URL); the writer's base for a record from before that.
        "storage_url": data.get("storage_url") or (f"{base}/{storage_key}" if storage_key
                                                   else None),
        "sha256": data.get("sha256") or None, "generation_id": own or None,
        "generation_ids": generation_ids, "siblings": sibling_ids,
        "sibling_of": _parent(job_id) if "~" in job_id else None,
        # What the upstream reported for the last generation, and what the
        # spend accounting counted for the job (every generation; the
        # estimate where nothing was reported; worker/spend.py).
        "credits_used": _number(data.get("credits_used")),
        "credits": _number(data.get("credits")),
    }
    for name in TIMINGS:
        row[name] = _iso(data.get(name))
    row.update({
        "attempts": _int(data.get("attempts")) or 0, "polls": _int(data.get("polls")) or 0,
        "error": data.get("last_error") or None,
        "outcome_unknown": data.get("outcome_unknown") == "1",
    })
    return row


def _int(raw: str | None) -> int | None:
    try:
        return int(raw) if raw else None
    except ValueError:
        return None


def _number(raw: str | None) -> int | float | None:
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return int(value) if value.is_integer() else value


def _iso(raw: str | None) -> str | None:
    """Float epoch seconds as ISO-8601 UTC (`2025-01-31T02:03:04.567Z`); None if unset."""
    try:
        seconds = float(raw) if raw else 0.0
    except ValueError:
        return None
    if seconds <= 0:
        return None
    stamp = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def write_jsonl(rows: Iterable[dict], out: IO[str]) -> int:
    count = 0
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        count += 1
    return count


def write_csv(rows: Iterable[dict], out: IO[str]) -> int:
    """A header, then one line per row: `parameters` as JSON, lists joined by
    spaces, booleans as true/false, missing values empty."""
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    count = 0
    for row in rows:
        writer.writerow([_cell(row.get(name)) for name in COLUMNS])  # older manifests lack some
        count += 1
    return count


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    if isinstance(value, list):
        return " ".join(str(item) for item in value)
    return str(value)
