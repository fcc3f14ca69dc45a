"""Re-enqueue clarity: new jobs that differ from a batch's jobs only by their
parameters.

A job's id is a digest of its prompt and parameters, so enqueuing the same
prompts into the same batch with other flags (`--resolution 480P` after a
720P night) adds a second job, and a second charge, per prompt. That is
refused unless `--allow-variants` says it is meant. Reading the batch's
prompts costs one pass over its jobs, and only when the file brings new jobs
into a batch that already has some.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import redis

from worker import keys
from worker.errors import InputError

from .prompt_formats import trimmed
from .prompts import asked, asked_key

CHUNK = 5000
# Every KEYS[i]'s request, in one JSON string (false where the job is gone).
_READ_REQUESTS = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGET', key, 'request') end
return cjson.encode(out)
"""


@dataclass(frozen=True)
class Variants:
    count: int  # new jobs whose prompt a job of the batch already has
    fields: tuple[str, ...]  # the parameters they differ by
    # New requests (their indexes) that a job of the batch already asks, a
    # default spelled out or not: under another digest id, the same video.
    already: frozenset[int] = frozenset()


def find_variants(client: redis.Redis, batch: str, new_requests: list[dict],
                  file_requests: list[dict] | None = None,
                  named: list[bool] | None = None) -> Variants:
    """The new requests whose prompt is already in `batch` with other
    parameters that the file itself does not ask for: a file with a 480P and
    a 720P take of each prompt, enqueued again after an interrupted run, is
    finishing its own work, not adding variants. Parameters are compared as
    asked (`prompts.asked`: a default spelled out is no difference). A new
    job with an id of its own (`named`) asking what a job of the batch asks
    is the user's own second take (the upstream draws a new video), as two
    named lines asking the same in one file are: neither already there nor
    a variant."""
    if not new_requests or not client.exists(keys.batch_jobs(batch)):
        return Variants(0, ())
    wanted = {_prompt(request) for request in new_requests}
    in_file = {asked_key(request) for request in file_requests or new_requests}
    had: set[str] = set()
    existing: dict[str, list[dict]] = {}
    for request in _requests(client, batch):
        if _prompt(request) not in wanted:
            continue
        key = asked_key(request)
        had.add(key)
        if key not in in_file:
            existing.setdefault(_prompt(request), []).append(asked(request))
    named = named or [False] * len(new_requests)
    asked_before = [asked_key(request) in had for request in new_requests]
    count, fields = 0, set()
    for at, request in enumerate(new_requests):
        mine = asked(request)
        others = [old for old in existing.get(_prompt(request), []) if old != mine]
        if others and not asked_before[at]:
            count += 1
            fields |= {name for old in others for name in set(old) | set(mine)
                       if old.get(name) != mine.get(name)}
    already = frozenset(at for at, before in enumerate(asked_before)
                        if before and not named[at])
    return Variants(count, tuple(sorted(fields)), already)


def _prompt(request: dict) -> str:
    """The prompt as asked: a stray BOM at an end is no other prompt (review 114)."""
    prompt = request.get("prompt")
    return trimmed(prompt) if isinstance(prompt, str) else ""


def _requests(client: redis.Redis, batch: str):
    read = client.register_script(_READ_REQUESTS)
    ids = sorted(str(job_id) for job_id in client.smembers(keys.batch_jobs(batch)))
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start:start + CHUNK]
        for raw in json.loads(read([keys.job(keys.job_ref(batch, i)) for i in chunk])):
            if isinstance(raw, str):
                try:
                    yield json.loads(raw)
                except ValueError:
                    continue


def check_variants(client: redis.Redis, batch: str, path: str, new_requests: list[dict],
                   allow: bool, file_requests: list[dict] | None = None,
                   named: list[bool] | None = None) -> Variants:
    """The new jobs that are variants (refused, InputError, unless `allow`),
    and those the batch already asks."""
    found = find_variants(client, batch, new_requests, file_requests, named)
    if found.count and not allow:
        word = "job differs" if found.count == 1 else "jobs differ"
        raise InputError(
            f"{path}: {found.count} new {word} from jobs already in batch {batch!r} only by "
            f"parameters ({', '.join(found.fields)}): each would be a new generation and a "
            "new charge; add --allow-variants to enqueue them anyway (nothing was enqueued)")
    return found
