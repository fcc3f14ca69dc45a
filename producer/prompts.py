"""Parse and validate a whole prompt file before anything is enqueued.

`vidq enqueue FILE` reads prompts from a `.txt`, `.jsonl` or `.csv` file and
turns every good line into a request in the upstream contract's field names.
Nothing is enqueued unless the whole file is good, so this module collects
every bad line and raises them together in one `PromptFileError`: a user
fixing a 5,000-line batch should see all of its problems in one run.

Job ids are either given per line (`id`) or derived from the request itself,
so loading the same file with the same defaults always yields the same ids and
re-enqueueing a batch is idempotent.
"""
from __future__ import annotations

import codecs
import csv
import difflib
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

from worker.contract import ASPECT_RATIOS, DEFAULT_MODEL, OPTIONAL_FIELDS, RESOLUTIONS
from worker.errors import InputError

# Public: the CLI reuses it to validate --batch names.
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")

MAX_SEED = 2**31 - 1

# Every field a line may carry, with its Python type; `id` names the job and
# is never sent upstream.
FIELD_TYPES: dict[str, type] = {"prompt": str, "id": str, "model": str, **OPTIONAL_FIELDS}
# Fields the CLI flags may set for every line; a line may override each.
DEFAULT_FIELDS = frozenset({"model", *OPTIONAL_FIELDS})
CHOICES = {"resolution": RESOLUTIONS, "aspect_ratio": ASPECT_RATIOS}
CSV_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}

# Names as the user wrote them (JSON), not Python's.
_TYPE_NAMES = {
    str: "string", int: "integer", bool: "boolean", float: "number",
    list: "array", dict: "object", type(None): "null",
}


@dataclass(frozen=True)
class PromptJob:
    """One job to enqueue: where it came from, its id, and the request body."""

    line: int  # 1-based line number where the record starts
    job_id: str
    request: dict  # contract field names, ready to send (model, prompt, ...)


@dataclass(frozen=True)
class LineError:
    """One problem with a prompt file; line 0 means the file or the defaults."""

    line: int
    field: str | None
    reason: str

    def __str__(self) -> str:
        parts = [f"line {self.line}"] if self.line else []
        if self.field:
            parts.append(self.field)
        parts.append(self.reason)
        return ": ".join(parts)


@dataclass(frozen=True)
class PromptFile:
    """A fully validated prompt file, ready to enqueue."""

    path: str
    jobs: list[PromptJob]
    merged_duplicates: int  # identical lines folded into an earlier job


class PromptFileError(InputError):
    """Raised when a prompt file has bad lines; carries every one of them."""

    def __init__(self, path: str | os.PathLike, errors: list[LineError]):
        # Both go to Exception.__init__ so the exception survives pickling.
        super().__init__(os.fspath(path), list(errors))
        self.path = os.fspath(path)
        self.errors = list(errors)

    def __str__(self) -> str:
        # Count lines, not errors: one line may have several problems.
        count = len({error.line for error in self.errors if error.line})
        if not count:  # only file-level problems ("file not found"): no list needed
            return "\n".join(f"{self.path}: {error}" for error in self.errors)
        header = f"{self.path}: {count} bad line{'' if count == 1 else 's'}:"
        return "\n  ".join([header, *map(str, self.errors)])


class _Record(NamedTuple):
    """What a format parser found at one line: fields, errors, or both."""

    line: int
    fields: dict | None  # None when the line could not be parsed at all
    errors: list[LineError]


def load_prompts(path: str | os.PathLike, defaults: dict) -> PromptFile:
    """Parse and validate the whole file at `path`; raise PromptFileError if any line is bad."""
    path = os.fspath(path)
    base_request, errors = _base_request(defaults)
    if errors:
        raise PromptFileError(path, errors)
    parser = _parser_for(path)
    if isinstance(parser, LineError):
        raise PromptFileError(path, [parser])
    text = _read_text(path)
    if isinstance(text, LineError):
        raise PromptFileError(path, [text])
    jobs, merged, errors = _assemble(parser(text), base_request)
    if errors:
        raise PromptFileError(path, errors)
    return PromptFile(path=path, jobs=jobs, merged_duplicates=merged)


# --- defaults, file type, reading -------------------------------------------


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


def _parser_for(path: str) -> Callable[[str], Iterator[_Record]] | LineError:
    """Return the record parser for the file's extension, or why there is none."""
    extension = os.path.splitext(path)[1].lower()
    parsers = {".txt": _txt_records, ".jsonl": _jsonl_records, ".csv": _csv_records}
    if extension in parsers:
        return parsers[extension]
    shown = f"'{extension}'" if extension else "(no extension)"
    return LineError(0, None, f"unsupported file type {shown} (use .txt, .jsonl or .csv)")


def _read_text(path: str) -> str | LineError:
    """Read the file as UTF-8 without its BOM, or say why it cannot be read."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return LineError(0, None, "file not found")
    except OSError as exc:
        return LineError(0, None, f"cannot read file: {exc.strerror or exc}")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return LineError(line, None, f"not valid UTF-8 (byte 0x{data[exc.start]:02x})")


# --- format parsers: text -> _Record ----------------------------------------
# Lines are split on "\n" only: str.splitlines() also splits on form feeds and
# U+2028, which would shift line numbers away from what editors show.


def _txt_records(text: str) -> Iterator[_Record]:
    """One prompt a line; blank lines and `#` comments skipped."""
    for number, raw in enumerate(text.split("\n"), 1):
        prompt = raw.strip()
        if prompt and not prompt.startswith("#"):
            yield _Record(number, {"prompt": prompt}, [])


def _jsonl_records(text: str) -> Iterator[_Record]:
    """One JSON object a line; blank lines skipped."""
    for number, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            reason = f"invalid JSON: {exc.msg} (column {exc.colno})"
            yield _Record(number, None, [LineError(number, None, reason)])
            continue
        except RecursionError:  # absurdly deep nesting blows the C parser's stack
            yield _Record(number, None, [LineError(number, None, "invalid JSON: nested too deeply")])
            continue
        if not isinstance(value, dict):
            reason = f"expected a JSON object, got {_type_name(value)}"
            yield _Record(number, None, [LineError(number, None, reason)])
            continue
        yield _Record(number, value, [])


def _csv_records(text: str) -> Iterator[_Record]:
    """A header row naming the fields, then one record a row."""
    rows = _csv_rows(text)
    header = next(rows, None)
    if header is None:  # empty file: reported as "no prompts in file"
        return
    if header.error:
        yield _Record(header.line, None, [header.error])
        return
    columns = [name.strip() for name in header.cells]
    header_errors = _check_header(header.line, columns)
    if header_errors:
        yield _Record(header.line, None, header_errors)
        return
    for row in rows:
        if row.error:
            yield _Record(row.line, None, [row.error])
        else:
            yield _csv_record(row.line, columns, row.cells)


class _CsvRow(NamedTuple):
    line: int  # where the row starts
    cells: list[str]
    error: LineError | None  # broken CSV; reading stops here


def _csv_rows(text: str) -> Iterator[_CsvRow]:
    """Yield non-blank CSV rows with the line where each starts; stop at broken CSV."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    try:
        for cells in reader:
            if any(cell.strip() for cell in cells):
                yield _CsvRow(start, cells, None)
            # A quoted cell may span lines, so the next record starts after
            # however many lines the reader has consumed so far.
            start = reader.line_num + 1
    except csv.Error as exc:
        yield _CsvRow(start, [], LineError(start, None, f"invalid CSV: {exc}"))


def _check_header(line: int, columns: list[str]) -> list[LineError]:
    """Reject a missing `prompt` column (alone), else unknown or repeated columns."""
    if "prompt" not in columns:
        # One error: without prompts no row can be checked, so more would be noise.
        close = difflib.get_close_matches("prompt", columns, n=1)
        hint = f" (is {close[0]!r} a typo?)" if close else ""
        return [LineError(line, None, f"missing 'prompt' column{hint}")]
    errors = [LineError(line, None, _unknown_field(name)) for name in columns if name not in FIELD_TYPES]
    repeated = sorted({name for name in columns if columns.count(name) > 1})
    errors += [LineError(line, None, f"column {name!r} appears more than once") for name in repeated]
    return errors


def _csv_record(line: int, columns: list[str], cells: list[str]) -> _Record:
    """Convert one row's cells to typed fields; empty cells mean "not given"."""
    fields: dict = {}
    errors = []
    if len(cells) > len(columns):  # extra cells would otherwise vanish silently
        errors.append(LineError(line, None, f"{len(cells)} cells but the header has {len(columns)} columns"))
    for name, cell in zip(columns, cells):
        text = cell.strip()
        if not text and name != "prompt":  # an empty prompt is an error, not "not given"
            continue
        value, reason = _convert_cell(name, text)
        if reason:
            errors.append(LineError(line, name, reason))
        else:
            fields[name] = value
    return _Record(line, fields, errors)


def _convert_cell(field: str, text: str) -> tuple[object, str | None]:
    """Turn a CSV cell (always a string) into the field's type."""
    expected = FIELD_TYPES[field]
    if expected is bool:
        value = CSV_BOOLEANS.get(text.lower())
        if value is None:
            return None, f"{text!r} is not a boolean (use true/false, 1/0 or yes/no)"
        return value, None
    if expected is int:
        try:
            return int(text), None
        except ValueError:
            return None, f"{text!r} is not an integer"
    return text, None


# --- validation and assembly -------------------------------------------------


def _assemble(records: Iterator[_Record], base_request: dict) -> tuple[list[PromptJob], int, list[LineError]]:
    """Validate every record, fold duplicates, and collect every error."""
    jobs: dict[str, PromptJob] = {}
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
        outcome = _add_job(jobs, job)
        if isinstance(outcome, LineError):
            errors.append(outcome)
        else:
            merged += outcome
    if not seen_any:
        errors.append(LineError(0, None, "no prompts in file"))
    return list(jobs.values()), merged, errors


def _add_job(jobs: dict[str, PromptJob], job: PromptJob) -> int | LineError:
    """Add `job`; return 1 if it merged into an identical job, or the conflict."""
    first = jobs.get(job.job_id)
    if first is None:
        jobs[job.job_id] = job
        return 0
    if first.request == job.request:
        return 1
    reason = f"duplicate id {job.job_id!r} (first on line {first.line}) with different parameters"
    return LineError(job.line, None, reason)


def _job_from_fields(line: int, fields: dict, base_request: dict) -> tuple[PromptJob | None, list[LineError]]:
    """Validate one record's fields and build its job, or return its errors."""
    errors = _field_errors(line, fields)
    if errors:
        return None, errors
    request = _build_request(fields, base_request)
    job_id = fields.get("id") or _digest_id(request)
    return PromptJob(line=line, job_id=job_id, request=request), []


def _field_errors(line: int, fields: dict) -> list[LineError]:
    """Every problem with one record's fields, unknown ones first."""
    errors = []
    if not fields.keys() <= FIELD_TYPES.keys():  # the common case skips this loop
        errors = [LineError(line, None, _unknown_field(name)) for name in fields if name not in FIELD_TYPES]
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
    """A stable id from the request, so re-enqueueing the same file is idempotent."""
    canonical = _CANONICAL_JSON.encode(request)
    return "p-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]


def _check_value(field: str, value: object) -> str | None:
    """Return why `value` is not acceptable for `field`, or None if it is."""
    expected = FIELD_TYPES[field]
    # bool is a subclass of int, but `"seed": true` is surely a mistake.
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        return f"expected {_TYPE_NAMES[expected]}, got {_type_name(value)}"
    if field in CHOICES and value not in CHOICES[field]:
        return f"{value!r} is not one of {', '.join(CHOICES[field])}"
    if field == "seed" and not 0 <= value <= MAX_SEED:
        return f"{value} is out of range 0..{MAX_SEED}"
    if expected is str:
        return _check_text(field, value)
    return None


def _check_text(field: str, value: str) -> str | None:
    """Checks shared by every string field."""
    if field in ("prompt", "model") and not value.strip():
        return f"empty {field}"
    if field == "id" and not ID_PATTERN.fullmatch(value):
        return f"{value!r} is not 1-128 characters of A-Z a-z 0-9 . _ -"
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone "\ud800" escape in JSON; it cannot be sent
        return "contains an unpaired surrogate"
    return None


def _unknown_field(name: str) -> str:
    """Name an unknown field, suggesting the known one it was probably meant to be."""
    close = difflib.get_close_matches(name, sorted(FIELD_TYPES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown field {name!r}{hint}"


def _type_name(value: object) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)
