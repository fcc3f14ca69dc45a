"""Property tests: hostile prompt files, hostile upstream answers, unsafe names.

Three promises are checked against generated input:

- `load_prompts` either returns jobs whose every request is valid per the
  contract, or raises an `InputError` whose message names the file; nothing
  else ever escapes it (no traceback for a bad file).
- A job id or batch name can never act as a path or a Redis key outside its
  prefix: no separators, no '.'/'..', no hidden or option-like names.
- `parse_generation` returns a well-typed `Generation` or raises `BadResponse`;
  `error_message` always returns a short string.

Files live in one module-scoped directory (hypothesis re-runs the test body
many times inside one function-scoped fixture, so `tmp_path` would be shared
anyway and hypothesis refuses it).
"""
from __future__ import annotations

import csv
import io
import json
import math
import string
from pathlib import PurePosixPath, PureWindowsPath

import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from producer.enqueue import check_batch_name
from producer.prompt_formats import FIELD_TYPES
from producer.prompts import (
    ID_PATTERN,
    MAX_SEED,
    LineError,
    PromptFile,
    PromptFileError,
    load_prompts,
)
from worker.contract import ASPECT_RATIOS, DEFAULT_MODEL, OPTIONAL_FIELDS, RESOLUTIONS
from worker.errors import BadResponse, InputError
from worker.generation import Generation, parse_generation, salvaged_id
from worker.upstream_text import MAX_MESSAGE_CHARS, error_message

DEFAULTS = {"model": DEFAULT_MODEL}
PROPERTY = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX_LINE_ERROR_CHARS = 1_000  # one bad line's message, however big the line

# Names that must never become a job id or batch name: path traversal, path and
# key separators, NUL, too long, hidden or option-like, and non-ASCII look-alikes
# of '.', '/' and letters.
UNSAFE_NAMES = [
    "../x", "..", ".", "a/b", "a\\b", "%2e%2e", "a:b", "x\x00y", "x" * 129,
    ".hidden", "-rf", "", " a", "a ", "a\n", "/abs", "C:x", "a/../b",
    "\u2024\u2024",        # ONE DOT LEADER x2, renders as '..'
    "\uff0e\uff0e",        # FULLWIDTH FULL STOP x2
    "a\u2215b",            # DIVISION SLASH
    "a\uff0fb",            # FULLWIDTH SOLIDUS
    "a\u29f5b",            # REVERSE SOLIDUS OPERATOR
    "\u0430dmin",          # Cyrillic a + "dmin"
    "\uff41",              # FULLWIDTH LATIN SMALL LETTER A
    "k\u212a",             # KELVIN SIGN, case-folds to 'k'
    "a\u200bb",            # ZERO WIDTH SPACE
    "a\ufe55b",            # SMALL COLON
]
SAFE_NAMES = ["a", "0", "_x", "night-run_2.v1", "a..b", "a-", "a.", "x" * 128, "p-" + "0" * 24]
SAFE_CHARS = frozenset(string.ascii_letters + string.digits + "._-")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Write bytes to a file with the given extension in a module-wide directory."""
    directory = tmp_path_factory.mktemp("properties")

    def write(extension: str, data: bytes):
        path = directory / f"prompts{extension}"
        path.write_bytes(data)
        return path

    return write


# --- what a good result looks like ------------------------------------------


def assert_valid_request(request: dict) -> None:
    assert set(request) <= {"model", "prompt", *OPTIONAL_FIELDS}
    for field in ("model", "prompt"):
        assert isinstance(request[field], str) and request[field].strip()
    for field, value in request.items():
        expected = FIELD_TYPES[field]
        assert type(value) is expected, (field, value)  # exact: no bool for int
        if expected is str:
            assert "\x00" not in value
            value.encode("utf-8")  # no lone surrogates
    assert request.get("resolution", RESOLUTIONS[0]) in RESOLUTIONS
    assert request.get("aspect_ratio", ASPECT_RATIOS[0]) in ASPECT_RATIOS
    assert 0 <= request.get("seed", 0) <= MAX_SEED


def assert_safe_name(name: str) -> None:
    """A name that is one plain path component and one Redis key part."""
    assert 1 <= len(name) <= 128
    assert set(name) <= SAFE_CHARS  # no '/', '\\', ':', NUL, spaces or non-ASCII
    assert name[0] not in ".-"
    assert PurePosixPath(name).name == name and PureWindowsPath(name).name == name


def check_load(path, defaults=DEFAULTS) -> PromptFile | None:
    """Load `path`: a valid PromptFile, or an InputError naming the file; nothing else."""
    try:
        result = load_prompts(path, defaults)
    except InputError as exc:
        message = str(exc)
        assert str(path) in message
        message.encode("utf-8")  # printable as is
        if isinstance(exc, PromptFileError):
            assert exc.errors
            for error in exc.errors:
                assert isinstance(error, LineError)
                assert len(str(error)) <= MAX_LINE_ERROR_CHARS, str(error)[:500]
        return None
    assert isinstance(result, PromptFile) and result.jobs
    for job in result.jobs:
        assert_valid_request(job.request)
        assert_safe_name(job.job_id)
        assert job.line >= 1
    return result


# --- hostile content ----------------------------------------------------------

EXTENSIONS = st.sampled_from([".txt", ".jsonl", ".csv"])
BOM = b"\xef\xbb\xbf"


def big(alphabet: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Short text, or one character repeated up to ~1 MB (hypothesis's own text stays small)."""
    repeated = st.builds(lambda char, count: char * count,
                         alphabet, st.sampled_from([1_000, 70_000, 140_000, 1_100_000]))
    return st.one_of(st.text(alphabet, max_size=30), repeated)


NUMBER_STRINGS = st.sampled_from([
    "5", "-1", "+5", "1_000", " 7 ", "1e3", "5.0", "0x10", "\u0663", "\uff15", "NaN", "Infinity",
    str(MAX_SEED), str(MAX_SEED + 1), "9" * 5000, "",
])
ENUM_STRINGS = st.sampled_from([*RESOLUTIONS, *ASPECT_RATIOS, "480p", " 720P", "1080P", "16/9"])
IDS = st.sampled_from(UNSAFE_NAMES + SAFE_NAMES)
FIELD_NAMES = st.sampled_from(
    [*FIELD_TYPES, "Prompt", "promt", "", " prompt", "x" * 5000, "\ud800"])

JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True), big(st.characters()), NUMBER_STRINGS,
    ENUM_STRINGS, IDS, st.sampled_from(["", "   ", "\x00", "a\x00b", "\ud800", "\ufeff", "#"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children,
                                                                     max_size=3),
    max_leaves=8,
)


@st.composite
def jsonl_line(draw) -> str:
    """One hostile JSONL line: an object (maybe with repeated keys), other JSON, or junk."""
    kind = draw(st.sampled_from(["object", "object", "object", "value", "junk", "deep", "bignum"]))
    if kind == "object":
        pairs = draw(st.lists(st.tuples(FIELD_NAMES, JSON_VALUES), max_size=6))
        if draw(st.booleans()):
            pairs.insert(0, ("prompt", draw(big(st.characters()))))
        return "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"
    if kind == "value":
        return json.dumps(draw(JSON_VALUES))
    if kind == "deep":
        depth = draw(st.sampled_from([10, 900, 1_000, 5_000, 100_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return '{"prompt": "a", "seed": ' + opener * depth + "1" + closer * depth + "}"
    if kind == "bignum":
        digits = draw(st.sampled_from([11, 4300, 4301, 10_000]))
        return '{"prompt": "a", "seed": ' + "1" * digits + "}"
    return draw(st.text(max_size=50))


@st.composite
def csv_text(draw) -> str:
    """A header of (mostly) known fields, then ragged rows of hostile cells."""
    columns = draw(st.lists(st.one_of(st.sampled_from(list(FIELD_TYPES)), FIELD_NAMES),
                            min_size=1, max_size=6))
    odd_cells = st.sampled_from(["true", "Yes", "0", "maybe", '"', 'a"b', "a\nb", "a,b", "\r"])
    cells = st.one_of(NUMBER_STRINGS, ENUM_STRINGS, IDS, big(st.characters()), odd_cells)
    rows = draw(st.lists(st.lists(cells, max_size=len(columns) + 2), max_size=5))
    if draw(st.booleans()):  # properly quoted
        out = io.StringIO(newline="")
        csv.writer(out).writerows([columns, *rows])
        return out.getvalue()
    joiner = draw(st.sampled_from(["\n", "\r\n", "\r"]))  # naive: quotes and newlines break it
    return joiner.join(",".join(row) for row in [columns, *rows])


def to_bytes(text: str, bom: bool) -> bytes:
    return (BOM if bom else b"") + text.encode("utf-8", "surrogatepass")


@PROPERTY
@given(extension=EXTENSIONS, data=st.binary(max_size=2_000))
@example(extension=".txt", data=b"ok\n\xff\xfe\x00")
@example(extension=".csv", data=BOM + BOM + b"prompt\nx\n")
def test_arbitrary_bytes(files, extension, data):
    """Any bytes at all: a valid PromptFile or an InputError naming the file."""
    check_load(files(extension, data))


@PROPERTY
@given(extension=EXTENSIONS, text=st.text(max_size=2_000), bom=st.booleans())
def test_arbitrary_text(files, extension, text, bom):
    """Any text (NULs, lone surrogates written raw, odd newlines) in any format."""
    check_load(files(extension, to_bytes(text, bom)))


@PROPERTY
@given(lines=st.lists(jsonl_line(), min_size=1, max_size=6), bom=st.booleans(),
       newline=st.sampled_from(["\n", "\r\n"]))
@example(lines=['{"prompt": "a", "seed": 1' + "0" * 5000 + "}"], bom=False, newline="\n")
@example(lines=['{"prompt": "a", "seed": ' + "[" * 100_000 + "]" * 100_000 + "}"], bom=False,
         newline="\n")
@example(lines=['{"prompt": "a", "seed": NaN, "watermark": Infinity}'], bom=False, newline="\n")
@example(lines=['{"prompt": "' + "x" * 1_100_000 + '", "resolution": "' + "y" * 100_000 + '"}'],
         bom=True, newline="\n")
def test_hostile_jsonl(files, lines, bom, newline):
    """Wrong types for every field, numbers as strings, NaN, huge and deep values, junk."""
    check_load(files(".jsonl", to_bytes(newline.join(lines), bom)))


@PROPERTY
@given(text=csv_text(), bom=st.booleans())
@example(text="prompt,seed\n" + "x" * 1_100_000 + ",1\n", bom=False)
@example(text='prompt,seed\n"a\n\n""b""",1,2,3\nc\n"unclosed\n', bom=False)
@example(text="prompt,seed\na," + "9" * 5000 + "\n", bom=False)
def test_hostile_csv(files, text, bom):
    """Ragged rows, embedded quotes and newlines, numbers and booleans spelt oddly."""
    check_load(files(".csv", to_bytes(text, bom)))


@PROPERTY
@given(lines=st.lists(big(st.characters()), max_size=5))
def test_hostile_txt(files, lines):
    """Every non-blank, non-comment line becomes a valid prompt, or the file is refused."""
    check_load(files(".txt", to_bytes("\n".join(lines), False)))


# --- bugs found by the properties above, pinned --------------------------------


def errors_in(path) -> list[LineError]:
    with pytest.raises(PromptFileError) as caught:
        load_prompts(path, DEFAULTS)
    return caught.value.errors


def test_jsonl_integer_too_long_is_a_line_error(files):
    """An integer past int()'s 4300-digit limit was a raw ValueError traceback."""
    path = files(".jsonl", b'{"prompt": "a"}\n{"prompt": "b", "seed": 1' + b"0" * 5000 + b"}\n")
    assert errors_in(path) == [LineError(2, None, "invalid JSON: number too long")]


def test_jsonl_repeated_key_is_an_error(files):
    """`{"prompt": "a", "prompt": "b"}` silently kept "b"; a repeat is as suspect as a typo."""
    path = files(".jsonl", b'{"prompt": "a", "prompt": "b"}\n'
                           b'{"seed": "x", "prompt": "c", "seed": 1}\n')
    assert [str(error) for error in errors_in(path)] == [
        "line 1: key 'prompt' appears more than once",
        "line 2: key 'seed' appears more than once",
    ]


@pytest.mark.parametrize("cell", ["1_000", "\u0663", "\uff15", "0x10", "5.0"])
def test_csv_seed_takes_ascii_digits_only(files, cell):
    """int() alone accepted '1_000' and non-ASCII digits such as Arabic-Indic three."""
    path = files(".csv", f"prompt,seed\na,{cell}\n".encode())
    assert errors_in(path) == [LineError(2, "seed", f"{cell!r} is not an integer")]


def test_huge_values_are_not_quoted_whole(files):
    """A 1 MB bad value or a 4300-digit seed made a 1 MB error message."""
    path = files(".jsonl", ('{"prompt": "a", "resolution": "' + "x" * 1_000_000 + '"}\n'
                            '{"prompt": "b", "seed": ' + "9" * 4300 + "}\n").encode())
    first, second = errors_in(path)
    assert first.reason == f"{'x' * 40!r}... (1000000 characters) is not one of 480P, 720P"
    assert second.reason == f"a 4300-digit number is out of range 0..{MAX_SEED}"


def test_nul_in_path_is_an_input_error(tmp_path):
    """open() raises ValueError for a NUL in the path; that was a traceback."""
    with pytest.raises(PromptFileError) as caught:
        load_prompts(str(tmp_path / "a\x00b.txt"), DEFAULTS)
    assert caught.value.errors == [LineError(0, None, "cannot read file: embedded null byte")]


# --- job ids and batch names ----------------------------------------------------


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_unsafe_id_in_jsonl_is_a_line_error(files, name):
    """Each traversal attempt as a jsonl `id` is refused on its own line, naming the field."""
    text = '{"prompt": "ok"}\n' + json.dumps({"id": name, "prompt": "p"}) + "\n"
    path = files(".jsonl", text.encode())
    (error,) = errors_in(path)
    assert (error.line, error.field) == (2, "id")
    assert error.reason.endswith(("must not start with '.' or '-'",
                                  "is not 1-128 characters of A-Z a-z 0-9 . _ -"))


def test_every_unsafe_id_is_listed(files):
    """All bad ids in one file are reported at once, each with its line number."""
    text = "".join(json.dumps({"id": name, "prompt": f"p{n}"}) + "\n"
                   for n, name in enumerate(UNSAFE_NAMES))
    path = files(".jsonl", text.encode())
    with pytest.raises(PromptFileError) as caught:
        load_prompts(path, DEFAULTS)
    assert [(e.line, e.field) for e in caught.value.errors] == [
        (n, "id") for n in range(1, len(UNSAFE_NAMES) + 1)]
    message = str(caught.value)
    assert message.startswith(f"{path}: {len(UNSAFE_NAMES)} bad lines:")
    assert "\n  line 1: id: '../x' is not 1-128 characters" in message
    assert "\n  line 2: id: '..' must not start with '.' or '-'" in message


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_unsafe_batch_name_is_refused(name):
    """Each traversal attempt as a batch name raises InputError, saying why."""
    with pytest.raises(InputError) as raised:
        check_batch_name(name)
    message = str(raised.value)
    assert message.startswith("batch name ")
    # The rule, once (it was said twice: "is not 1-128 characters ...: use 1-128 ...").
    assert message.endswith("with '.' or '-'") and message.count("1-128") <= 1


@pytest.mark.parametrize("name", SAFE_NAMES)
def test_safe_names_are_accepted(files, name):
    """Ordinary names still work as batch names and as ids."""
    assert check_batch_name(name) == name
    path = files(".jsonl", json.dumps({"id": name, "prompt": "p"}).encode())
    assert load_prompts(path, DEFAULTS).jobs[0].job_id == name


@settings(max_examples=300, deadline=None)
@given(name=st.one_of(st.text(max_size=130), st.text("./\\:-_aZ09%\x00", max_size=6)))
@example(name=".")
@example(name="..")
def test_accepted_batch_names_are_safe(name):
    """Whatever check_batch_name accepts is one plain path component and key part."""
    try:
        check_batch_name(name)
    except InputError as exc:
        assert str(exc).startswith("batch name ")
        return
    assert_safe_name(name)
    assert ID_PATTERN.fullmatch(name)


# --- upstream answers -----------------------------------------------------------

WRONG_TYPES = st.one_of(
    JSON_SCALARS,
    st.lists(JSON_SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=5), JSON_SCALARS, max_size=3),
)
FIELD_VALUES = st.one_of(st.sampled_from(["gen-1", "completed", "queued", "failed", "", "https://x/v.mp4"]),
                         WRONG_TYPES)
NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(),
                    st.integers(min_value=-(10**400), max_value=10**400), WRONG_TYPES)

BODIES = st.one_of(
    st.fixed_dictionaries({}, optional={
        "id": FIELD_VALUES,
        "status": FIELD_VALUES,
        "video": st.one_of(WRONG_TYPES, st.fixed_dictionaries({}, optional={"url": FIELD_VALUES})),
        "meta": st.one_of(WRONG_TYPES, st.fixed_dictionaries({}, optional={
            "usage": st.one_of(WRONG_TYPES, st.fixed_dictionaries({}, optional={
                "credits_used": NUMBERS}))})),
        "error": st.one_of(WRONG_TYPES, st.fixed_dictionaries({}, optional={
            "message": FIELD_VALUES, "name": FIELD_VALUES})),
        "message": FIELD_VALUES,
        "detail": st.one_of(WRONG_TYPES, st.lists(st.one_of(
            WRONG_TYPES, st.fixed_dictionaries({}, optional={"msg": FIELD_VALUES})), max_size=3)),
    }),
    JSON_VALUES,
)


class Body(bytes):
    """A response body that prints short: a failing 200 kB example would flood the report."""

    def __repr__(self) -> str:
        if len(self) <= 200:
            return f"Body({bytes(self)!r})"
        return f"Body({bytes(self[:60])!r} + ... + {bytes(self[-20:])!r}, {len(self)} bytes)"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis's printer
        printer.text(repr(self))


@st.composite
def body_bytes(draw) -> Body:
    kind = draw(st.sampled_from(["json", "json", "json", "bytes", "deep", "huge"]))
    if kind == "json":
        return Body(json.dumps(draw(BODIES)).encode())  # NaN and Infinity included
    if kind == "deep":
        depth = draw(st.sampled_from([10, 900, 1_000, 5_000, 100_000]))
        return Body(b"[" * depth + b"]" * depth)
    if kind == "huge":
        return Body(json.dumps({"id": "g", "status": "x" * 1_000_000, "message": "m" * 1_000_000})
                    .encode())
    return Body(draw(st.binary(max_size=300)))


def response(status: int, body: bytes, content_type: str | None = "application/json"):
    r = requests.Response()
    r.status_code = status
    r._content = body
    r.reason = "Reason"
    if content_type is not None:
        r.headers["Content-Type"] = content_type
    return r


CONTENT_TYPES = st.sampled_from(["application/json", "application/json; charset=latin-1",
                                 "text/html", None])
KNOWN_BAD_BODIES = [Body(body) for body in (
    b'{"id": "g", "status": "completed", "video": {"url": ["https://x/v.mp4"]}}',
    b'{"id": "g", "status": "completed", "meta": {"usage": {"credits_used": NaN}}}',
    b'{"id": "g", "status": "completed", "meta": {"usage": {"credits_used": "3"}}}',
    b"[" * 100_000 + b"]" * 100_000,
)]


@PROPERTY
@given(body=body_bytes(), content_type=CONTENT_TYPES)
@example(body=KNOWN_BAD_BODIES[0], content_type="application/json")
@example(body=KNOWN_BAD_BODIES[1], content_type="application/json")
@example(body=KNOWN_BAD_BODIES[2], content_type="application/json")
@example(body=KNOWN_BAD_BODIES[3], content_type="application/json")
def test_parse_generation(body, content_type):
    """A well-typed Generation, or BadResponse; never another exception."""
    try:
        generation = parse_generation(response(200, body, content_type))
    except BadResponse:
        return
    assert isinstance(generation, Generation)
    assert isinstance(generation.id, str) and generation.id
    assert isinstance(generation.status, str) and generation.status
    assert generation.video_url is None or isinstance(generation.video_url, str)
    assert generation.error_message is None or isinstance(generation.error_message, str)
    credits = generation.credits_used
    assert credits is None or (type(credits) is float and math.isfinite(credits)), credits


# Small: every cut of the answer is tried.
SMALL_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3),
                                                                     children, max_size=3),
    max_leaves=6)


@PROPERTY
@given(generation_id=st.text(min_size=1, max_size=40) | st.integers(min_value=0),
       before=st.dictionaries(st.text(max_size=5).filter(lambda k: k != "id"), SMALL_JSON,
                              max_size=3),
       after=st.dictionaries(st.text(max_size=5), SMALL_JSON, max_size=3),
       indent=st.sampled_from([None, 1]), ascii_only=st.booleans())
def test_an_answer_cut_anywhere_never_names_a_wrong_id(generation_id, before, after, indent,
                                                      ascii_only):
    """Cut at every byte, a POST's answer gives its true top-level id or none:
    never an id shortened by the cut (a number's first digits, a string's
    head), nor one from a nested object; whole, it gives the id."""
    answer = {**before, "id": generation_id, **{k: v for k, v in after.items() if k != "id"}}
    raw = json.dumps(answer, indent=indent, ensure_ascii=ascii_only).encode()
    assert salvaged_id(raw) == str(generation_id)
    for cut in range(len(raw)):
        assert salvaged_id(raw[:cut]) in (None, str(generation_id)), raw[:cut]


@PROPERTY
@given(status=st.sampled_from([200, 400, 401, 404, 409, 422, 429, 500, 502, 503]),
       body=body_bytes(), content_type=CONTENT_TYPES)
@example(status=500, body=KNOWN_BAD_BODIES[3], content_type="application/json")
def test_error_message(status, body, content_type):
    """Always a string of at most MAX_MESSAGE_CHARS, whatever the body."""
    message = error_message(response(status, body, content_type))
    assert isinstance(message, str)
    assert len(message) <= MAX_MESSAGE_CHARS
