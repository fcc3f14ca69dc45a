"""The event stream `vidq:events`: every stored video, failed job and
finished batch, for a content pipeline that should hear about each video as
it lands instead of scanning storage.

Each event is written by the same Lua call that records its state change:
the job's transition into `done` or `failed` (lua/transition.lua), and the
batch's manifest mark (lua/manifest_written.lua). `Announcing` runs such a
script unchanged, wrapped with an after-step (lua/event_job.lua,
lua/event_batch.lua) that adds the stream entry only when that very call made
the change. So a crash can never record "done" without its event, and a
repeated or stale step never announces a second time. Delivery to readers is
at-least-once: a consumer group hands an entry out again until it is acked.

Schema version 1 (stream fields; every value a string):

    v              "1"
    type           video.stored | job.failed | batch.finished
    at             Redis time of the change, Unix seconds with microseconds
    batch          the batch name
  video.stored and job.failed:
    job            "<batch>:<custom_id>", vidq's reference to the job
    custom_id      the prompt's id (its `id` field, else a digest of prompt and parameters)
    generation_id  the upstream's generation id ("" if none)
  video.stored:
    storage_url    where the video is (file:// or s3://)
    sha256, bytes  of the stored video
    credits_used   as the upstream reported it ("" if it did not)
  job.failed:
    reason         why, as `vidq status` shows it
    outcome_unknown "1" if its POST's outcome is unknown (it may have been charged)
  batch.finished:
    total, done, failed, cancelled    the batch's counts when it finished
    manifest_url   its manifest.jsonl in storage (errors.jsonl beside it)

The stream is trimmed (XTRIM MAXLEN ~ VIDQ_EVENTS_MAXLEN) on every
reconciler pass; an entry is gone for a consumer further behind than that.
"""
from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlparse

import redis

from . import keys

VERSION = 1
LUA_DIR = Path(__file__).with_name("lua")
EVENTS_KEY = keys.EVENTS


class EventType(StrEnum):
    VIDEO_STORED = "video.stored"
    JOB_FAILED = "job.failed"
    BATCH_FINISHED = "batch.finished"


# Fields whose value is a number (or a flag) in the JSON form of an event.
_INTEGERS = frozenset({"bytes", "total", "done", "failed", "cancelled"})
_NUMBERS = frozenset({"credits_used", "at"})


class Announcing:
    """A state-changing script run together with its event's after-step, in
    one Lua call. Called like the script itself (keys=, args=): the stream's
    key and `extra` (a value the after-step needs) are appended here and
    taken off again before the script sees its KEYS and ARGV."""

    def __init__(self, client: redis.Redis, script: str, after: str, extra: str = ""):
        self.extra = extra
        self._script = client.register_script(_wrapped(script, after))

    def __call__(self, keys: list, args: list, client=None):
        return self._script(keys=[*keys, EVENTS_KEY], args=[*args, self.extra], client=client)


def batch_finished_script(client: redis.Redis, storage_url: str, batch: str) -> Announcing:
    """lua/manifest_written.lua, announcing `batch.finished` when it marks the batch."""
    from .manifest import manifest_key

    return Announcing(client, "manifest_written", "event_batch",
                      extra=object_url(storage_url, manifest_key(batch)))


def object_url(storage_url: str, key: str) -> str:
    """The URL of a stored object, as the report and the manifest give it."""
    base = storage_url.rstrip("/")
    if not urlparse(storage_url).scheme:
        base = Path(storage_url).expanduser().resolve().as_uri()
    return f"{base}/{key}"


def video_url(settings, key: str) -> str:
    return object_url(settings.storage_url, key)


def _wrapped(script: str, after: str) -> str:
    from .jobs import lua_constants

    types = ", ".join(f"{t.name.lower()} = '{t.value}'" for t in EventType)
    return "\n".join([
        lua_constants(),
        f"local EVENT_VERSION = '{VERSION}'",
        f"local EVENT = {{{types}}}",
        "local EVENT_STREAM, EVENT_EXTRA = KEYS[#KEYS], ARGV[#ARGV]",
        "local INNER_KEYS = {unpack(KEYS, 1, #KEYS - 1)}",
        "local INNER_ARGV = {unpack(ARGV, 1, #ARGV - 1)}",
        "local function event_now()",
        "  local t = redis.call('TIME')",
        "  return string.format('%d.%06d', tonumber(t[1]), tonumber(t[2]))",
        "end",
        # The script's own KEYS and ARGV shadow the globals: it sees what it always saw.
        "local function inner(KEYS, ARGV)",
        (LUA_DIR / f"{script}.lua").read_text(),
        "end",
        (LUA_DIR / f"{after}.lua").read_text(),
        "local before = event_before(INNER_KEYS, INNER_ARGV)",
        "local result = inner(INNER_KEYS, INNER_ARGV)",
        "event_after(INNER_KEYS, INNER_ARGV, before, result)",
        "return result",
    ])


def ensure_group(client: redis.Redis, group: str, start: str = "0") -> bool:
    """Create a consumer group on the stream (and the stream); False if it existed."""
    try:
        client.xgroup_create(EVENTS_KEY, group, id=start, mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
        return False
    return True


def trim(client: redis.Redis, maxlen: int) -> int:
    """Trim the stream to about `maxlen` entries (whole nodes: cheap)."""
    return int(client.xtrim(EVENTS_KEY, maxlen=maxlen, approximate=True))


def as_json(event_id: str, fields: dict) -> dict:
    """The JSON form of a stream entry, as webhooks carry it:
    {"v", "id", "type", "timestamp", "data": {every other field, typed}}."""
    data: dict = {}
    for name, raw in fields.items():
        if name in ("v", "type"):
            continue
        data[name] = _typed(name, raw)
    at = float(fields.get("at") or 0)
    stamp = datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")
    return {"v": int(fields.get("v") or VERSION), "id": event_id, "type": fields.get("type"),
            "timestamp": stamp.replace("+00:00", "Z"), "data": data}


def body(event_id: str, fields: dict) -> bytes:
    """The exact bytes a webhook POSTs (and signs)."""
    return json.dumps(as_json(event_id, fields), separators=(",", ":"),
                      ensure_ascii=False).encode()


def _typed(name: str, raw: str):
    if name == "outcome_unknown":
        return raw == "1"
    if raw in ("", None):
        return None if name in _INTEGERS | _NUMBERS else raw
    if name in _INTEGERS:
        return int(float(raw))
    if name in _NUMBERS:
        return float(raw)
    return raw
