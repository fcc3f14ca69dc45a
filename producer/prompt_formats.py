"""Read a prompt file's text and split it into raw per-line records.

This is the format layer under `producer.prompts`: it picks a reader by file
extension (`.txt`, `.jsonl`, `.csv`), decodes the bytes as UTF-8 (dropping a
BOM), and yields one `Record` per non-blank line or CSV row, with the line
where it starts. Readers only check syntax and, for CSV, convert cells to the
field's type; `producer.prompts` validates the values and builds the jobs.

Also home to the small types both layers share (`LineError`, `Record`,
`FIELD_TYPES`), so that this module never imports `producer.prompts`.
"""
from __future__ import annotations

import codecs
import csv
import difflib
import io
import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from worker.contract import OPTIONAL_FIELDS

# Every field a line may carry, with its Python type; `id` names the job and
# is never sent upstream.
FIELD_TYPES: dict[str, type] = {"prompt": str, "id": str, "model": str, **OPTIONAL_FIELDS}
CSV_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
# ASCII digits only: int() alone would also take "1_000", " +5" and "\u0663" (Arabic three).
CSV_INTEGER = re.compile(r"[+-]?[0-9]+")
# Longest text quoted whole in an error message; a 1 MB cell must not flood the terminal.
SHOWN_CHARS = 40

# Names as the user wrote them (JSON), not Python's.
TYPE_NAMES = {
    str: "string", int: "integer", bool: "boolean", float: "number",
    list: "array", dict: "object", type(None): "null",
}


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


class Record(NamedTuple):
    """What a format parser found at one line: fields, errors, or both."""

    line: int
    fields: dict | None  # None when the line could not be parsed at all
    errors: list[LineError]


# --- file type and reading --------------------------------------------------


def parser_for(path: str) -> Callable[[str], Iterator[Record]] | LineError:
    """Return the record parser for the file's extension, or why there is none."""
    extension = os.path.splitext(path)[1].lower()
    parsers = {".txt": _txt_records, ".jsonl": _jsonl_records, ".csv": _csv_records}
    if extension in parsers:
        return parsers[extension]
    shown = f"'{extension}'" if extension else "(no extension)"
    return LineError(0, None, f"unsupported file type {shown} (use .txt, .jsonl or .csv)")


def read_text(path: str) -> str | LineError:
    """Read the file as UTF-8 without its BOM, or say why it cannot be read."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return LineError(0, None, "file not found")
    except OSError as exc:
        return LineError(0, None, f"cannot read file: {exc.strerror or exc}")
    except ValueError as exc:  # a NUL in the path: open() refuses it
        return LineError(0, None, f"cannot read file: {exc}")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    if _looks_utf16(data):
        return LineError(0, None, "looks like UTF-16 (a NUL beside every character, or its "
                                  "BOM): save the file as UTF-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return LineError(line, None, f"not valid UTF-8 (byte 0x{data[exc.start]:02x})")


def _looks_utf16(data: bytes) -> bool:
    """Windows tools save "Unicode" text as UTF-16, with or without a BOM; read
    as UTF-8 it is a NUL on every line, or one bad byte, and neither says why."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return True
    if b"\x00" not in data:  # UTF-16 of any line break holds a NUL byte
        return False
    if _utf8_with_stray_nuls(data):
        return False
    for encoding in ("utf-16-le", "utf-16-be"):
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        if "\n" in text and "\x00" not in text:
            return True
    # One line of Latin text: a NUL in every high byte (LE: odd, BE: even).
    head = data[:4096]
    halves = (head[0::2].count(0) / max(1, len(head[0::2])),
              head[1::2].count(0) / max(1, len(head[1::2])))
    return len(head) >= 4 and max(halves) >= 0.9 and min(halves) <= 0.1


def _utf8_with_stray_nuls(data: bytes) -> bool:
    """UTF-8 text with a NUL on a few lines: those lines' error, said with
    their number. One right after a line break decoded as UTF-16 ("save as
    UTF-8", no line named; review 139). UTF-16 has a NUL on every line (its
    line breaks' other byte), and read as UTF-8 its non-Latin letters come
    out as control characters (Cyrillic: U+0004 after each; review 141)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if _C0_BUT_NUL.search(text):
        return False
    lines = [line for line in data.split(b"\n") if line]
    return 2 * sum(b"\x00" in line for line in lines) <= len(lines)


_C0_BUT_NUL = re.compile("[\x01-\x08\x0b\x0c\x0e-\x1f]")


# Unicode's Default_Ignorable_Code_Point beyond the format characters (Cf):
# fillers and selectors that render as nothing.
_IGNORABLE = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F),
              (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8),
              (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF))


def _invisible(char: str) -> bool:
    code = ord(char)
    return (char.isspace() or unicodedata.category(char) == "Cf"
            or any(low <= code <= high for low, high in _IGNORABLE))


def is_blank(text: str) -> bool:
    """Nothing a reader would see: whitespace, format characters (a BOM left by
    `cat a.txt b.txt`, a zero-width space, a soft hyphen) and the other code
    points Unicode says to ignore (a Hangul filler, a variation selector),
    which `str.strip()` keeps. Such a prompt would be a paid video of nothing."""
    return all(_invisible(char) for char in text)


def trimmed(text: str) -> str:
    """`text` without the invisible characters at either end."""
    start = visible_start(text)
    return visible_start(start[::-1])[::-1]


def visible_start(text: str) -> str:
    """`text` from its first visible character: a `#` after a stray BOM still
    starts a comment."""
    for index, char in enumerate(text):
        if not _invisible(char):
            return text[index:]
    return ""


# --- format parsers: text -> Record ----------------------------------------
# Lines are split on "\n" only: str.splitlines() also splits on form feeds and
# U+2028, which would shift line numbers away from what editors show.


def _txt_records(text: str) -> Iterator[Record]:
    """One prompt a line; blank lines and `#` comments skipped."""
    for number, raw in enumerate(text.split("\n"), 1):
        prompt = raw.strip()
        if not is_blank(prompt) and not visible_start(prompt).startswith("#"):
            # A CRLF line's CR is stripped above; one left inside means lines
            # ended by CR alone (classic Mac), read as one long prompt.
            errors = [LineError(number, "prompt", "a carriage return inside the line: "
                                "lines ended by CR alone? save the file with LF or CRLF "
                                "line endings")] if "\r" in prompt else []
            yield Record(number, {"prompt": prompt}, errors)


class _RepeatedKey(ValueError):
    """A JSON object names the same key twice; json.loads would keep the last silently."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _object_without_repeats(pairs: list[tuple[str, object]]) -> dict:
    found = dict(pairs)
    if len(found) != len(pairs):
        counts = Counter(name for name, _ in pairs)
        raise _RepeatedKey(next(name for name, _ in pairs if counts[name] > 1))
    return found


# Built once: json.loads() with a hook would build a new decoder for every line.
_JSON_DECODER = json.JSONDecoder(object_pairs_hook=_object_without_repeats)


def _jsonl_records(text: str) -> Iterator[Record]:
    """One JSON object a line; blank lines skipped."""
    for number, raw in enumerate(text.split("\n"), 1):
        if is_blank(raw):
            continue
        try:
            # A BOM inside the file: `cat a.jsonl b.jsonl` of two saved with one.
            value = _JSON_DECODER.decode(raw.removeprefix("\ufeff"))
        except json.JSONDecodeError as exc:
            reason = f"invalid JSON: {exc.msg} (column {exc.colno})"
            yield Record(number, None, [LineError(number, None, reason)])
            continue
        except _RepeatedKey as exc:  # "a typo must not be silently ignored", nor a repeat
            reason = f"key {shown(exc.name)} appears more than once"
            yield Record(number, None, [LineError(number, None, reason)])
            continue
        except ValueError:  # an integer literal longer than int()'s 4300-digit limit
            yield Record(number, None, [LineError(number, None, "invalid JSON: number too long")])
            continue
        except RecursionError:  # absurdly deep nesting blows the C parser's stack
            yield Record(number, None, [LineError(number, None, "invalid JSON: nested too deeply")])
            continue
        if not isinstance(value, dict):
            reason = f"expected a JSON object, got {type_name(value)}"
            yield Record(number, None, [LineError(number, None, reason)])
            continue
        yield Record(number, value, [])


def _csv_records(text: str) -> Iterator[Record]:
    """A header row naming the fields, then one record a row."""
    rows = _csv_rows(text)
    header = next(rows, None)
    if header is None:  # empty file: reported as "no prompts in file"
        return
    if header.error:
        yield Record(header.line, None, [header.error])
        return
    columns = [name.strip() for name in header.cells]
    header_errors = _check_header(header.line, columns)
    if header_errors:
        yield Record(header.line, None, header_errors)
        if "prompt" not in columns:
            return
        # The rows are still checked, so the file is fixed in one round; an
        # unknown or repeated column's cells are left out ('').
        columns = [name if name in FIELD_TYPES and columns.index(name) == at else ""
                   for at, name in enumerate(columns)]
    for row in rows:
        if row.error:
            yield Record(row.line, None, [row.error])
        elif _same_cells(row.cells, header.cells):
            # Two files joined (`cat a.csv b.csv`): read as a row, the header
            # was a prompt "prompt", bought as a video of the word (review 139).
            yield Record(row.line, None, [LineError(
                row.line, None, "the header row again (files joined?): remove it")])
        else:
            yield _csv_record(row.line, columns, row.cells)


def _same_cells(cells: list[str], header: list[str]) -> bool:
    return [cell.strip().lstrip("\ufeff") for cell in cells] == [
        name.strip().lstrip("\ufeff") for name in header]


class _CsvRow(NamedTuple):
    line: int  # where the row starts
    cells: list[str]
    error: LineError | None  # broken CSV; reading stops here


def _csv_rows(text: str) -> Iterator[_CsvRow]:
    """Yield non-blank CSV rows with the line where each starts; stop at broken CSV."""
    # The module's default of 131,072 characters a cell stopped reading at a long
    # prompt, one a .jsonl file takes (the upstream publishes no maximum).
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    try:
        for cells in reader:
            if not all(is_blank(cell) for cell in cells):
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
    errors = [LineError(line, None, unknown_field(name))
              for name in columns if name not in FIELD_TYPES]
    repeated = sorted({name for name in columns if columns.count(name) > 1})
    errors += [LineError(line, None, f"column {shown(name)} appears more than once")
               for name in repeated]
    return errors


def _csv_record(line: int, columns: list[str], cells: list[str]) -> Record:
    """Convert one row's cells to typed fields; empty cells mean "not given"."""
    fields: dict = {}
    errors = []
    if len(cells) > len(columns):  # extra cells would otherwise vanish silently
        extra = f"{len(cells)} cells but the header has {len(columns)} columns"
        errors.append(LineError(line, None, extra))
    for name, cell in zip(columns, cells, strict=False):  # a short row leaves fields unset
        text = cell.strip()
        if not name or (not text and name != "prompt"):  # an empty prompt is an error
            continue
        value, problem = _convert_cell(name, text)
        if problem:
            errors.append(LineError(line, name, problem))
        else:
            fields[name] = value
    return Record(line, fields, errors)


def _convert_cell(field: str, text: str) -> tuple[object, str | None]:
    """Turn a CSV cell (always a string) into the field's type."""
    expected = FIELD_TYPES[field]
    if expected is bool:
        value = CSV_BOOLEANS.get(text.lower())
        if value is None:
            return None, f"{shown(text)} is not a boolean (use true/false, 1/0 or yes/no)"
        return value, None
    if expected is int:
        if not CSV_INTEGER.fullmatch(text):
            return None, f"{shown(text)} is not an integer"
        try:
            return int(text), None
        except ValueError:  # more digits than int() converts (4300)
            return None, f"{shown(text)} has too many digits"
    return text, None


# --- shared wording ----------------------------------------------------------


def unknown_field(name: str) -> str:
    """Name an unknown field, suggesting the known one it was probably meant to be."""
    close = difflib.get_close_matches(name, sorted(FIELD_TYPES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown field {shown(name)}{hint}"


def shown(text: str) -> str:
    """`text` quoted for an error message, cut short if it is long."""
    if len(text) <= SHOWN_CHARS:
        return repr(text)
    return f"{text[:SHOWN_CHARS]!r}... ({len(text)} characters)"


def type_name(value: object) -> str:
    return TYPE_NAMES.get(type(value), type(value).__name__)
