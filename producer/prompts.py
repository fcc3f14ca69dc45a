"""Parse and validate a whole prompt file before anything is enqueued.

`vidq enqueue FILE` reads prompts from a `.txt`, `.jsonl` or `.csv` file and
turns every good line into a request in the upstream contract's field names.
Nothing is enqueued unless the whole file is good, so this module collects
every bad line and raises them together in one `PromptFileError`: a user
fixing a 5,000-line batch should see all of its problems in one run.

Job ids are either given per line (`id`) or derived from the request itself,
so loading the same file with the same defaults always yields the same ids and
re-enqueueing a batch is idempotent.

Reading the file and splitting it into per-line records, for each format,
lives in `producer.prompt_formats`; this module validates and assembles them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from worker.contract import (
    ASPECT_RATIOS,
    DEFAULT_MODEL,
    DEFAULT_PARAMETERS,
    MODELS,
    OPTIONAL_FIELDS,
    RESOLUTIONS,
)
from worker.errors import InputError

# LineError is part of this module's public API; it lives in prompt_formats
# so that the format readers can use it without importing this module.
from .prompt_formats import (
    FIELD_TYPES,
    TYPE_NAMES,
    LineError,
    Record,
    is_blank,
    parser_for,
    read_text,
    shown,
    trimmed,
    type_name,
    unknown_field,
)

__all__ = [
    "ID_PATTERN", "LineError", "PromptFile", "PromptFileError", "PromptJob", "id_problem",
    "load_prompts",
]

# Public: producer.enqueue.check_batch_name applies the same rule to --batch names.
# Job ids and batch names become file names and Redis key parts, so: ASCII
# letters, digits, '.', '_' and '-' only (no '/', '\\', ':' or NUL), and never a
# leading '.' ('.', '..', hidden files such as storage's '.name.part' temp
# files) or '-' (read as an option by command-line tools).
ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_ID_CHARACTERS = re.compile(r"[A-Za-z0-9._-]{1,128}")

MAX_SEED = 2**31 - 1

# Fields the CLI flags may set for every line; a line may override each.
DEFAULT_FIELDS = frozenset({"model", *OPTIONAL_FIELDS})
CHOICES = {"model": MODELS, "resolution": RESOLUTIONS, "aspect_ratio": ASPECT_RATIOS}


@dataclass(frozen=True)
class PromptJob:
    """One job to enqueue: where it came from, its id, and the request body."""

    line: int  # 1-based line number where the record starts
    job_id: str
    request: dict  # contract field names, ready to send (model, prompt, ...)
    named: bool = False  # the line gave its own id (else a digest of the request)


@dataclass(frozen=True)
class PromptFile:
    """A fully validated prompt file, ready to enqueue."""

    path: str
    jobs: list[PromptJob]
    merged_duplicates: int  # identical lines folded into an earlier job


def shown_path(path: str | os.PathLike) -> str:
    """`path` as text that can be printed and stored: a name that is not
    UTF-8 (Latin-1 from an old zip) keeps its bytes as `\\xe9` escapes
    instead of failing every write and print it reaches (review 114)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class PromptFileError(InputError):
    """Raised when a prompt file has bad lines; carries every one of them."""

    def __init__(self, path: str | os.PathLike, errors: list[LineError]):
        # Both go to Exception.__init__ so the exception survives pickling.
        self.path = shown_path(path)
        super().__init__(self.path, list(errors))
        self.errors = list(errors)

    def __str__(self) -> str:
        # Count lines, not errors: one line may have several problems.
        count = len({error.line for error in self.errors if error.line})
        if not count:  # only file-level problems ("file not found"): no list needed
            return "\n".join(f"{self.path}: {error}" for error in self.errors)
        header = f"{self.path}: {count} bad line{'' if count == 1 else 's'}:"
        return "\n  ".join([header, *map(str, self.errors)])


class OptionError(PromptFileError):
    """A bad default given on the command line (`--seed -5`): about the flag,
    not the file, whatever file it came with."""

    def __str__(self) -> str:
        return "\n".join(f"--{error.field.replace('_', '-')}: {error.reason}" if error.field
                         else error.reason for error in self.errors)


def load_prompts(path: str | os.PathLike, defaults: dict) -> PromptFile:
    """Parse and validate the whole file at `path`; raise PromptFileError if any line is bad."""
    path = os.fspath(path)
    base_request, errors = _base_request(defaults)
    if errors:
        raise OptionError(path, errors)
    parser = parser_for(path)
    if isinstance(parser, LineError):
        raise PromptFileError(path, [parser])
    text = read_text(path)
    if isinstance(text, LineError):
        raise PromptFileError(path, [text])
    jobs, merged, errors = _assemble(parser(text), base_request)
    if errors:
        raise PromptFileError(path, errors)
    return PromptFile(path=path, jobs=jobs, merged_duplicates=merged)


# --- defaults ---------------------------------------------------------------


def _base_request(defaults: dict) -> tuple[dict, list[LineError]]:
    """Validate the CLI defaults and return them as a partial request."""
    request: dict = {"model": DEFAULT_MODEL}
    errors = []
    for field, value in defaults.items():
        if value is None:  # an unset CLI flag, not a value
            continue
        if field not in DEFAULT_FIELDS:
            errors.append(LineError(0, None, f"unknown default {field!r}"))
            continue
        reason = _check_value(field, value)
        if reason:
            errors.append(LineError(0, field, reason))
        else:
            request[field] = value
    return request, errors


# --- validation and assembly -------------------------------------------------


def _assemble(records: Iterator[Record],
              base_request: dict) -> tuple[list[PromptJob], int, list[LineError]]:
    """Validate every record, fold duplicates, and collect every error."""
    jobs: dict[str, PromptJob] = {}
    by_folded_id: dict[str, PromptJob] = {}
    errors: list[LineError] = []
    merged = 0
    seen_any = False
    for record in records:
        seen_any = True
        errors.extend(record.errors)
        if record.fields is None:
            continue
        job, job_errors = _job_from_fields(record.line, record.fields, base_request)
        errors.extend(job_errors)
        if job is None or record.errors:
            continue
        outcome = _add_job(jobs, by_folded_id, job)
        if isinstance(outcome, LineError):
            errors.append(outcome)
        else:
            merged += outcome
    if not seen_any:
        errors.append(LineError(0, None, "no prompts in file"))
    merged += _fold_same_asks(jobs)
    return list(jobs.values()), merged, errors


def _fold_same_asks(jobs: dict[str, PromptJob]) -> int:
    """Lines without an id asking what another line asks, a default spelled
    out or not, are that line's job: one with its own id if there is one
    (whichever comes first, as when the two are enqueued apart: enqueue.py),
    else the first. Returns how many were folded."""
    seen = {asked_key(job.request) for job in jobs.values() if job.named}
    folded = []
    for job_id, job in jobs.items():
        if not job.named:
            key = asked_key(job.request)
            if key in seen:
                folded.append(job_id)
            seen.add(key)
    for job_id in folded:
        del jobs[job_id]
    return len(folded)


def _add_job(jobs: dict[str, PromptJob], by_folded_id: dict[str, PromptJob],
             job: PromptJob) -> int | LineError:
    """Add `job`; return 1 if it merged into an identical job, or the conflict."""
    first = jobs.get(job.job_id)
    if first is None:
        twin = by_folded_id.setdefault(job.job_id.lower(), job)
        if twin is not job:
            return LineError(job.line, "id", case_twin(job.job_id, twin.job_id,
                                                       f" (line {twin.line})"))
        jobs[job.job_id] = job
        return 0
    if same_request(first.request, job.request):
        return 1
    reason = f"duplicate id {job.job_id!r} (first on line {first.line}) with different parameters"
    return LineError(job.line, None, reason)


def case_twin(job_id: str, twin_id: str, where: str) -> str:
    """Why an id that differs only in case from another is refused."""
    return (f"id {job_id!r} differs only in case from {twin_id!r}{where}: on a "
            "case-insensitive disk (macOS, Windows) both would be one video file")


def _job_from_fields(line: int, fields: dict,
                     base_request: dict) -> tuple[PromptJob | None, list[LineError]]:
    """Validate one record's fields and build its job, or return its errors."""
    errors = _field_errors(line, fields)
    if errors:
        return None, errors
    request = _build_request(fields, base_request)
    job_id = fields.get("id") or _digest_id(request)
    return PromptJob(line=line, job_id=job_id, request=request, named="id" in fields), []


def _field_errors(line: int, fields: dict) -> list[LineError]:
    """Every problem with one record's fields, unknown ones first."""
    errors = []
    if not fields.keys() <= FIELD_TYPES.keys():  # the common case skips this loop
        errors = [LineError(line, None, unknown_field(name))
                  for name in fields if name not in FIELD_TYPES]
    if "prompt" not in fields:
        errors.append(LineError(line, "prompt", "missing prompt"))
    for name, value in fields.items():
        reason = _check_value(name, value) if name in FIELD_TYPES else None
        if reason:
            errors.append(LineError(line, name, reason))
    return errors


def _build_request(fields: dict, base_request: dict) -> dict:
    """Merge a line over the defaults, keeping only fields that were given."""
    request = {"model": base_request["model"], "prompt": fields["prompt"].strip()}
    request.update(base_request)  # "model" keeps its place at the front
    for name, value in fields.items():
        if name in DEFAULT_FIELDS:  # everything but "id" and the already stripped "prompt"
            request[name] = value
    return request


# Built once: json.dumps() with options builds a new encoder on every call.
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _digest_id(request: dict) -> str:
    """A stable id from the request, so re-enqueueing the same file is
    idempotent. (The request as written: ids stored by earlier versions stay
    valid. A default spelled out is matched by `asked_key` instead.)"""
    canonical = _CANONICAL_JSON.encode(request)
    return "p-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]


TEXT_FIELDS = ("prompt", "negative_prompt")


def asked(request: dict) -> dict:
    """The request without the parameters given at the upstream's default:
    `"resolution": "720P"` asks what leaving it out asks (one job, one charge);
    nor the invisible characters at the ends of its texts (a stray BOM left
    by `cat a.txt b.txt`: the same prompt, one charge); an empty negative
    prompt is none, as an empty CSV cell is (review 114)."""
    found = {name: trimmed(value) if name in TEXT_FIELDS and isinstance(value, str) else value
             for name, value in request.items()
             if name not in DEFAULT_PARAMETERS or value != DEFAULT_PARAMETERS[name]}
    if found.get("negative_prompt") == "":
        del found["negative_prompt"]
    return found


def asked_key(request: dict) -> str:
    return _CANONICAL_JSON.encode(asked(request))


def same_request(first: dict, second: dict) -> bool:
    """Whether the upstream would generate the same thing for both."""
    return first == second or asked(first) == asked(second)


def _check_value(field: str, value: object) -> str | None:
    """Return why `value` is not acceptable for `field`, or None if it is."""
    expected = FIELD_TYPES[field]
    # bool is a subclass of int, but `"seed": true` is surely a mistake.
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        return f"expected {TYPE_NAMES[expected]}, got {type_name(value)}"
    if field in CHOICES and value not in CHOICES[field]:
        return f"{shown(str(value))} is not one of {', '.join(CHOICES[field])}"
    if field == "seed" and isinstance(value, int) and not 0 <= value <= MAX_SEED:
        digits = str(value)  # JSON allows up to 4300 digits: do not quote them all
        shown_value = digits if len(digits) <= 20 else f"a {len(digits.lstrip('-'))}-digit number"
        return f"{shown_value} is out of range 0..{MAX_SEED}"
    if isinstance(value, str):
        return _check_text(field, value)
    return None


_CONTROL = re.compile("[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]")  # not tab, LF, CR


def _check_text(field: str, value: str) -> str | None:
    """Checks shared by every string field."""
    if field in ("prompt", "model") and is_blank(value):
        return f"empty {field}" + (" (only invisible characters)" if value.strip() else "")
    if field == "id":
        problem = id_problem(value)
        if problem:
            return f"{shown(value)} {problem}"
    if "\x00" in value:
        return "contains a NUL character"
    if control := _CONTROL.search(value):
        # Never typed; a UTF-16 word without BOM or line break reads as UTF-8
        # with one after each letter (review 141: bought as a garbled prompt).
        return f"contains a control character (U+{ord(control.group()):04X})"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone "\ud800" escape in JSON; it cannot be sent
        return "contains an unpaired surrogate"
    return None


def id_problem(name: str) -> str | None:
    """Why `name` cannot be a job id or batch name, or None if it can."""
    if ID_PATTERN.fullmatch(name):
        return None
    if _ID_CHARACTERS.fullmatch(name):
        return "must not start with '.' or '-'"
    return "is not 1-128 characters of A-Z a-z 0-9 . _ -"
