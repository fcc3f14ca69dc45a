"""Tests for producer.prompts: parsing and validating whole prompt files."""
from __future__ import annotations

import hashlib
import json
import pickle

import pytest

from producer.prompts import (
    ID_PATTERN,
    LineError,
    PromptFileError,
    load_prompts,
)
from worker.contract import DEFAULT_MODEL

DEFAULTS = {"model": DEFAULT_MODEL}


def write(tmp_path, name, text):
    """Write `text` byte-for-byte (no newline translation) and return the path."""
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def errors_of(path, defaults=DEFAULTS):
    """Load a file that must fail and return its errors."""
    with pytest.raises(PromptFileError) as caught:
        load_prompts(path, defaults)
    return caught.value.errors


def jsonl(*records):
    return "".join(json.dumps(record) + "\n" for record in records)


# --- good files --------------------------------------------------------------


def test_txt_skips_comments_and_blank_lines(tmp_path):
    """A .txt file yields one stripped prompt per line, skipping blanks and # comments."""
    path = write(tmp_path, "p.txt", "# header\n\n  a red fox  \n   # indented comment\nblue sea\r\n")
    result = load_prompts(path, DEFAULTS)
    assert [(job.line, job.request) for job in result.jobs] == [
        (3, {"model": DEFAULT_MODEL, "prompt": "a red fox"}),
        (5, {"model": DEFAULT_MODEL, "prompt": "blue sea"}),
    ]
    assert result.merged_duplicates == 0
    assert result.path == str(path)


def test_jsonl_with_all_fields(tmp_path):
    """A .jsonl line with every field maps to contract names, with `id` as the job id."""
    record = {
        "id": "shot-1.a_b", "prompt": "a cat", "negative_prompt": "blur", "resolution": "480P",
        "aspect_ratio": "9:16", "seed": 42, "enhance_prompt": False, "watermark": True, "model": DEFAULT_MODEL,
    }
    result = load_prompts(write(tmp_path, "p.jsonl", "\n" + jsonl(record)), DEFAULTS)
    (job,) = result.jobs
    assert job.line == 2
    assert job.job_id == "shot-1.a_b"
    assert job.request == {
        "model": DEFAULT_MODEL, "prompt": "a cat", "negative_prompt": "blur", "resolution": "480P",
        "aspect_ratio": "9:16", "seed": 42, "enhance_prompt": False, "watermark": True,
    }


def test_fields_not_given_are_not_added(tmp_path):
    """A request carries only model, prompt and the fields actually given."""
    result = load_prompts(write(tmp_path, "p.jsonl", jsonl({"prompt": "x"})), DEFAULTS)
    assert result.jobs[0].request == {"model": DEFAULT_MODEL, "prompt": "x"}


def test_csv_quoted_commas_and_embedded_newline(tmp_path):
    """CSV handles quoted commas and newlines and reports the line where each record starts."""
    text = (
        "prompt,seed,watermark,resolution,id\n"
        '"a cat, sitting",7,yes,,\n'
        '"two\nlines",,FALSE,720P,\n'
        "\n"
        "plain,,,,my-id\n"
    )
    result = load_prompts(write(tmp_path, "p.csv", text), DEFAULTS)
    assert [(job.line, job.request) for job in result.jobs] == [
        (2, {"model": DEFAULT_MODEL, "prompt": "a cat, sitting", "seed": 7, "watermark": True}),
        (3, {"model": DEFAULT_MODEL, "prompt": "two\nlines", "resolution": "720P", "watermark": False}),
        (6, {"model": DEFAULT_MODEL, "prompt": "plain"}),
    ]
    assert result.jobs[2].job_id == "my-id"


def test_csv_error_line_number_after_embedded_newline(tmp_path):
    """An error after a multi-line quoted cell names the line where its own record starts."""
    text = 'prompt,resolution\n"one\ntwo\nthree",480P\nfour,1080P\n'
    (error,) = errors_of(write(tmp_path, "p.csv", text))
    assert error == LineError(5, "resolution", "'1080P' is not one of 480P, 720P")


def test_utf8_bom_is_stripped(tmp_path):
    """A leading UTF-8 BOM does not end up in the first prompt or CSV header."""
    csv_result = load_prompts(write(tmp_path, "p.csv", "\ufeffprompt\nhello\n"), DEFAULTS)
    txt_result = load_prompts(write(tmp_path, "p.txt", "\ufeffhello\n"), DEFAULTS)
    assert csv_result.jobs[0].request["prompt"] == txt_result.jobs[0].request["prompt"] == "hello"


def test_extension_is_case_insensitive(tmp_path):
    """`.TXT` is read as a text file."""
    assert len(load_prompts(write(tmp_path, "P.TXT", "hi\n"), DEFAULTS).jobs) == 1


# --- defaults ----------------------------------------------------------------


def test_defaults_applied_and_overridden_per_line(tmp_path):
    """CLI defaults fill every request; values on a line win over them."""
    defaults = {"model": DEFAULT_MODEL, "resolution": "480P", "seed": 1, "enhance_prompt": False,
                "negative_prompt": None}
    text = jsonl({"prompt": "a"}, {"prompt": "b", "resolution": "720P", "seed": 9, "model": DEFAULT_MODEL})
    first, second = load_prompts(write(tmp_path, "p.jsonl", text), defaults).jobs
    assert first.request == {"model": DEFAULT_MODEL, "prompt": "a", "resolution": "480P", "seed": 1,
                             "enhance_prompt": False}
    assert second.request == {"model": DEFAULT_MODEL, "prompt": "b", "resolution": "720P", "seed": 9,
                              "enhance_prompt": False}


def test_a_model_the_schema_does_not_name_is_a_line_error(tmp_path):
    """A model typo fails the file at enqueue, not every job at 2 a.m. with
    the upstream's 400 (the provider's schema names one model)."""
    text = jsonl({"prompt": "a"}, {"prompt": "b", "model": "alibaba/wan2.1-t2v-turb"})
    with pytest.raises(PromptFileError) as raised:
        load_prompts(write(tmp_path, "p.jsonl", text), DEFAULTS)
    assert ("line 2: model: 'alibaba/wan2.1-t2v-turb' is not one of alibaba/wan2.1-t2v-turbo"
            in str(raised.value))


def test_bad_default_is_a_line_zero_error(tmp_path):
    """A bad --resolution is reported once, at line 0, naming the field."""
    path = write(tmp_path, "p.txt", "hi\n")
    with pytest.raises(PromptFileError) as caught:
        load_prompts(path, {"model": DEFAULT_MODEL, "resolution": "1080P", "seed": -5})
    assert caught.value.errors[0] == LineError(0, "resolution",
                                               "'1080P' is not one of 480P, 720P")
    # About the flag, not the file: it said "p.txt: seed: -5 is out of range".
    assert str(caught.value).splitlines()[0] == "--resolution: '1080P' is not one of 480P, 720P"
    assert str(caught.value).splitlines()[1].startswith("--seed: -5 ")


def test_defaults_change_digest_ids(tmp_path):
    """Digest ids cover the defaults, so different flags give different ids."""
    path = write(tmp_path, "p.txt", "hi\n")
    plain = load_prompts(path, DEFAULTS).jobs[0].job_id
    seeded = load_prompts(path, {**DEFAULTS, "seed": 3}).jobs[0].job_id
    assert plain != seeded


# --- ids and duplicates ------------------------------------------------------


def test_a_default_spelled_out_is_the_same_job(tmp_path):
    """`resolution` 720P is what the upstream generates when it is left out: two
    lines asking the same thing were two jobs, two charges. They are one job
    (the first line's); a real difference still makes its own. Ids stay the
    digest of the request as written, as earlier versions stored them."""
    text = jsonl({"prompt": "same"}, {"prompt": "same", "resolution": "720P"},
                 {"prompt": "same", "aspect_ratio": "16:9", "watermark": False,
                  "enhance_prompt": True}, {"prompt": "same", "resolution": "480P"})
    result = load_prompts(write(tmp_path, "p.jsonl", text), DEFAULTS)
    assert [job.line for job in result.jobs] == [1, 4] and result.merged_duplicates == 2
    assert result.jobs[0].job_id == "p-" + hashlib.sha256(json.dumps(
        {"model": DEFAULT_MODEL, "prompt": "same"}, sort_keys=True,
        separators=(",", ":")).encode()).hexdigest()[:24]
    named = jsonl({"id": "one", "prompt": "same"}, {"id": "two", "prompt": "same",
                                                     "resolution": "720P"})
    assert [job.job_id for job in load_prompts(write(tmp_path, "n.jsonl", named),
                                               DEFAULTS).jobs] == ["one", "two"]
    # A line without an id is the named line asking the same, in either order.
    for lines in ([{"prompt": "same"}, {"id": "intro", "prompt": "same", "resolution": "720P"}],
                  [{"id": "intro", "prompt": "same"}, {"prompt": "same"}]):
        folded = load_prompts(write(tmp_path, "f.jsonl", jsonl(*lines)), DEFAULTS)
        assert [job.job_id for job in folded.jobs] == ["intro"] and folded.merged_duplicates == 1


def test_ids_are_stable_across_loads(tmp_path):
    """Loading the same file with the same defaults twice gives the same ids."""
    path = write(tmp_path, "p.jsonl", jsonl({"prompt": "a", "seed": 5}, {"prompt": "b"}))
    first = [job.job_id for job in load_prompts(path, DEFAULTS).jobs]
    second = [job.job_id for job in load_prompts(path, dict(DEFAULTS)).jobs]
    assert first == second
    assert all(job_id.startswith("p-") and len(job_id) == 26 for job_id in first)
    assert len(set(first)) == 2


def test_identical_duplicates_are_merged(tmp_path):
    """Lines with the same id and request become one job, counted as merged."""
    text = "same prompt\nother\nsame prompt\n  same prompt\n"
    result = load_prompts(write(tmp_path, "p.txt", text), DEFAULTS)
    assert [job.line for job in result.jobs] == [1, 2]
    assert result.merged_duplicates == 2


def test_duplicate_id_with_different_prompts_names_both_lines(tmp_path):
    """Same id with a different request is an error on the later line naming the first."""
    text = jsonl({"id": "x", "prompt": "a"}, {"prompt": "c"}, {"id": "x", "prompt": "b"})
    (error,) = errors_of(write(tmp_path, "p.jsonl", text))
    assert error.line == 3
    assert str(error) == "line 3: duplicate id 'x' (first on line 1) with different parameters"


def test_ids_that_differ_only_in_case_are_refused(tmp_path):
    """On a case-insensitive disk (macOS, Windows) 'Intro' and 'intro' are one
    video file: the second video would replace the first, paid for."""
    text = jsonl({"id": "Intro", "prompt": "a"}, {"id": "outro", "prompt": "b"},
                 {"id": "intro", "prompt": "c"})
    (error,) = errors_of(write(tmp_path, "p.jsonl", text))
    assert (error.line, error.field) == (3, "id")
    assert "'intro' differs only in case from 'Intro' (line 1)" in str(error)


# --- bad lines ---------------------------------------------------------------


def test_empty_prompt(tmp_path):
    """A blank prompt is rejected."""
    (error,) = errors_of(write(tmp_path, "p.jsonl", jsonl({"prompt": "   "})))
    assert error == LineError(1, "prompt", "empty prompt")


def test_a_prompt_of_invisible_characters_is_empty(tmp_path):
    """A zero-width space, a word joiner and a soft hyphen look like nothing,
    and were each a paid job; so was a BOM-only line (`cat a.txt b.txt` when
    b.txt starts with a BOM and a blank line), which a .txt reads as blank."""
    errors = errors_of(write(tmp_path, "p.jsonl", jsonl({"prompt": "\u200b"},
                                                         {"prompt": "\u2060\u00ad "},
                                                         {"prompt": "ok \u200b"})))
    assert errors == [LineError(1, "prompt", "empty prompt (only invisible characters)"),
                      LineError(2, "prompt", "empty prompt (only invisible characters)")]
    text = "a lighthouse\n\ufeff\n\u200b\nwaves on rocks\n"
    assert [job.line for job in load_prompts(write(tmp_path, "p.txt", text), DEFAULTS).jobs] \
        == [1, 4]
    # A comment after a stray BOM is a comment; a Hangul filler, a variation
    # selector and a grapheme joiner are as invisible (review 96).
    text = "\ufeff# section two\n\u3164\n\ufe0f\n\u034f\nok \U0001F44D\ufe0f\n"
    assert [job.line for job in load_prompts(write(tmp_path, "q.txt", text), DEFAULTS).jobs] \
        == [5]
    csv_errors = errors_of(write(tmp_path, "p.csv", "prompt,seed\n\u200b,1\n\ufeff,\nok,2\n"))
    assert csv_errors == [LineError(2, "prompt", "empty prompt (only invisible characters)")]


def test_missing_prompt(tmp_path):
    """A JSON object without `prompt` is rejected."""
    (error,) = errors_of(write(tmp_path, "p.jsonl", jsonl({"seed": 1})))
    assert error == LineError(1, "prompt", "missing prompt")


def test_broken_json_line(tmp_path):
    """A line that is not JSON reports the parser's reason."""
    (error,) = errors_of(write(tmp_path, "p.jsonl", '{"prompt": "a",}\n'))
    assert error.line == 1
    assert error.reason.startswith("invalid JSON: ") and "double quotes" in error.reason


def test_json_value_that_is_not_an_object(tmp_path):
    """A JSON array or string on a line is rejected."""
    errors = errors_of(write(tmp_path, "p.jsonl", '["a"]\n"a"\n'))
    assert [str(error) for error in errors] == [
        "line 1: expected a JSON object, got array",
        "line 2: expected a JSON object, got string",
    ]


def test_unknown_resolution(tmp_path):
    """A resolution outside the contract's list is rejected with the allowed values."""
    (error,) = errors_of(write(tmp_path, "p.jsonl", "\n\n" + jsonl({"prompt": "a", "resolution": "1080P"})))
    assert str(error) == "line 3: resolution: '1080P' is not one of 480P, 720P"


def test_unknown_aspect_ratio(tmp_path):
    """An aspect ratio outside the contract's list is rejected."""
    (error,) = errors_of(write(tmp_path, "p.jsonl", jsonl({"prompt": "a", "aspect_ratio": "21:9"})))
    assert error.field == "aspect_ratio"


def test_unknown_field(tmp_path):
    """A misspelt key is an error, not silently ignored."""
    (error,) = errors_of(write(tmp_path, "p.jsonl", jsonl({"prompt": "a", "resolutoin": "480P"})))
    assert error.line == 1
    assert error.reason.startswith("unknown field 'resolutoin'")


def test_bad_id_chars(tmp_path):
    """An id outside [A-Za-z0-9._-]{1,128} is an error naming the field."""
    text = jsonl({"id": "a/b", "prompt": "a"}, {"id": "x" * 129, "prompt": "b"}, {"id": "", "prompt": "c"})
    errors = errors_of(write(tmp_path, "p.jsonl", text))
    assert [(error.line, error.field) for error in errors] == [(1, "id"), (2, "id"), (3, "id")]


def test_seed_as_string_in_jsonl(tmp_path):
    """JSONL seeds must be JSON integers, not strings or booleans."""
    text = jsonl({"prompt": "a", "seed": "5"}, {"prompt": "b", "seed": True}, {"prompt": "c", "seed": -1})
    errors = errors_of(write(tmp_path, "p.jsonl", text))
    assert [str(error) for error in errors] == [
        "line 1: seed: expected integer, got string",
        "line 2: seed: expected integer, got boolean",
        "line 3: seed: -1 is out of range 0..2147483647",
    ]


def test_bad_bool_and_seed_from_csv(tmp_path):
    """CSV booleans accept only true/false/1/0/yes/no, and seeds must parse as int."""
    text = "prompt,watermark,enhance_prompt,seed\na,maybe,Yes,x1\n"
    errors = errors_of(write(tmp_path, "p.csv", text))
    assert [(error.line, error.field) for error in errors] == [(2, "watermark"), (2, "seed")]
    assert "'maybe'" in errors[0].reason


def test_files_joined_with_cat_keep_their_bom_out_of_the_request_count(tmp_path):
    """`cat a.txt b.txt` of two files saved with a BOM: the second's first line
    starts with U+FEFF. In .txt it was a second job for the same prompt, two
    charges; in .jsonl "invalid JSON" for a line that looks right (review 97)."""
    bom = "\ufeff"
    joined = load_prompts(write(tmp_path, "p.txt", f"{bom}a red fox\n{bom}a red fox\n"), DEFAULTS)
    assert len(joined.jobs) == 1
    lines = f'{bom}{{"prompt": "a blue whale"}}\n{bom}{{"prompt": "a green frog"}}\n'
    read = load_prompts(write(tmp_path, "p.jsonl", lines), DEFAULTS)
    assert [job.request["prompt"] for job in read.jobs] == ["a blue whale", "a green frog"]


def test_a_long_csv_cell_is_read_as_jsonl_reads_it(tmp_path):
    """csv's default cell limit (131,072) stopped the file at a 200,000-character
    prompt and hid the later lines' errors."""
    text = 'prompt,seed\n"short one",1\n"' + "y" * 200_000 + '",2\n"ok",abc\n'
    (error,) = errors_of(write(tmp_path, "p.csv", text))
    assert (error.line, error.field) == (4, "seed")


def test_csv_without_prompt_column(tmp_path):
    """A CSV header without `prompt` is a single error on line 1."""
    assert errors_of(write(tmp_path, "p.csv", "text,seed\na,1\n")) == [
        LineError(1, None, "missing 'prompt' column")
    ]
    (typo,) = errors_of(write(tmp_path, "p.csv", "promt,seed\na,1\n"))
    assert typo.reason == "missing 'prompt' column (is 'promt' a typo?)"


def test_csv_unknown_column(tmp_path):
    """An unknown CSV column is rejected at the header."""
    errors = errors_of(write(tmp_path, "p.csv", "prompt,colour,seed,seed\na,red,1,2\n"))
    assert errors == [
        LineError(1, None, "unknown field 'colour'"),
        LineError(1, None, "column 'seed' appears more than once"),
    ]


def test_a_bad_csv_header_still_lists_every_bad_row(tmp_path):
    """Only the header's unknown column was reported: the rows' own errors came
    one round of fixes later. The rows are checked too, leaving that column
    (and a repeated one's later cells) out."""
    text = "prompt,resolution,seed,foo,seed\nworld,999P,abc,x,1\nfine,480P,1,y,2\n"
    errors = errors_of(write(tmp_path, "p.csv", text))
    assert [(error.line, error.field) for error in errors] == [
        (1, None), (1, None), (2, "seed"), (2, "resolution")]
    assert str(errors[0]) == "line 1: unknown field 'foo'"


def test_nul_in_prompt(tmp_path):
    """A prompt containing a NUL character is rejected."""
    (error,) = errors_of(write(tmp_path, "p.txt", "ok\nbad\x00prompt\n"))
    assert (error.line, error.field) == (2, "prompt")


def test_lines_ended_by_cr_alone_are_refused_not_read_as_one_prompt(tmp_path):
    """A .txt saved with classic Mac line endings used to become one job whose
    prompt was 'one\rtwo\rthree'; CRLF stays fine."""
    path = tmp_path / "p.txt"
    path.write_bytes(b"one\rtwo\rthree\r")
    (error,) = errors_of(path)
    assert (error.line, error.field) == (1, "prompt") and "CR alone" in error.reason
    path.write_bytes(b"one\r\ntwo\r\n")
    assert [job.request["prompt"] for job in load_prompts(path, DEFAULTS).jobs] == ["one", "two"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
@pytest.mark.parametrize("text", ["a red fox\nblue sea\n", "кошка гуляет по саду\nсобака\n",
                                  "猫が庭を歩く\n犬\n", "a red fox", "кошка\n", "кошка\nсобака",
                                  "Москва\r\n", "上海の夜\n上\n", "😊 a smile\nЊ\n"])
def test_a_utf16_file_is_named_as_such(tmp_path, encoding, text):
    """Saved as "Unicode" by a Windows tool: without a BOM it was "contains a NUL
    character" on every line, with one "not valid UTF-8 (byte 0xff)"; Cyrillic
    or CJK without a BOM slipped past the first check (review 96)."""
    path = tmp_path / "p.txt"
    path.write_bytes(text.encode(encoding))
    (error,) = errors_of(path)
    assert error.line == 0 and "looks like UTF-16" in error.reason
    assert "save the file as UTF-8" in error.reason


def test_invalid_utf8_names_the_line(tmp_path):
    """Bytes that are not UTF-8 are reported with their line number."""
    path = tmp_path / "p.txt"
    path.write_bytes(b"fine\nbad \xff byte\n")
    (error,) = errors_of(path)
    assert error.line == 2 and "UTF-8" in error.reason


def test_several_bad_lines_are_all_reported(tmp_path):
    """Every bad line is reported at once, each with its number."""
    text = (
        jsonl({"prompt": "ok"})
        + "not json\n"
        + jsonl({"prompt": ""}, {"prompt": "ok2"}, {"prompt": "x", "seed": "1"})
        + "\n"
        + jsonl({"prompt": "y", "aspect_ratio": "2:1"})
    )
    with pytest.raises(PromptFileError) as caught:
        load_prompts(write(tmp_path, "p.jsonl", text), DEFAULTS)
    assert [error.line for error in caught.value.errors] == [2, 3, 5, 7]
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'p.jsonl'}: 4 bad lines:\n  line 2: invalid JSON")
    assert "\n  line 3: prompt: empty prompt" in message
    assert "\n  line 7: aspect_ratio: " in message


# --- file-level errors -------------------------------------------------------


@pytest.mark.parametrize("name, text", [
    ("empty.txt", ""),
    ("comments.txt", "# only\n\n   # comments\n"),
    ("blank.jsonl", "\n  \n"),
    ("header_only.csv", "prompt,seed\n"),
])
def test_file_without_prompts(tmp_path, name, text):
    """An empty or comment-only file is a single "no prompts in file" error."""
    assert errors_of(write(tmp_path, name, text)) == [LineError(0, None, "no prompts in file")]


def test_unsupported_extension(tmp_path):
    """An unknown extension is a single error listing the supported ones."""
    path = write(tmp_path, "p.xyz", "hi\n")
    assert errors_of(path) == [LineError(0, None, "unsupported file type '.xyz' (use .txt, .jsonl or .csv)")]


def test_missing_file(tmp_path):
    """A missing file is a single clear error, with the path in the message."""
    path = tmp_path / "nope.txt"
    with pytest.raises(PromptFileError) as caught:
        load_prompts(path, DEFAULTS)
    assert caught.value.errors == [LineError(0, None, "file not found")]
    assert str(caught.value) == f"{path}: file not found"


def test_error_is_an_input_error(tmp_path):
    """PromptFileError is an InputError, so the CLI reports it like any bad input."""
    from worker.errors import InputError

    assert issubclass(PromptFileError, InputError)


def test_error_survives_pickling(tmp_path):
    """PromptFileError pickles with its path and errors intact."""
    with pytest.raises(PromptFileError) as caught:
        load_prompts(tmp_path / "nope.txt", DEFAULTS)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (copy.path, copy.errors) == (caught.value.path, caught.value.errors)


def test_id_pattern_is_public_for_batch_names():
    """ID_PATTERN accepts batch-style names and rejects separators."""
    assert ID_PATTERN.fullmatch("night-run_2.v1")
    assert not ID_PATTERN.fullmatch("a b")


# --- scale -------------------------------------------------------------------


@pytest.mark.parametrize("name, make_line", [
    ("big.txt", lambda n: f"prompt number {n}"),
    ("big.jsonl", lambda n: json.dumps({"prompt": f"prompt number {n}", "seed": n})),
])
def test_hundred_thousand_lines(tmp_path, name, make_line):
    """A 100,000-line file loads into 100,000 jobs (timing is measured outside the tests)."""
    text = "\n".join(make_line(n) for n in range(100_000)) + "\n"
    result = load_prompts(write(tmp_path, name, text), DEFAULTS)
    assert len(result.jobs) == 100_000
    assert result.jobs[-1].line == 100_000


@pytest.mark.parametrize("joined", ["prompt,seed\na fox,1\nprompt,seed\na whale,2\n",
                                    "prompt\na fox\n\ufeffprompt\na whale\n"])
def test_a_csv_header_repeated_is_refused_not_bought_as_a_prompt(tmp_path, joined):
    """`cat monday.csv tuesday.csv > week.csv` repeats the header (and the
    second file's BOM): the row was enqueued as a prompt "prompt" (review 139)."""
    (error,) = errors_of(write(tmp_path, "week.csv", joined))
    assert str(error) == "line 3: the header row again (files joined?): remove it"


def test_one_nul_after_a_line_break_is_named_with_its_line_not_as_utf16(tmp_path):
    """At an even offset after a line break, the NUL made the file decode as
    UTF-16: "save the file as UTF-8", no line named (review 139)."""
    path = tmp_path / "p.txt"
    path.write_bytes(b"ab\n\x00cd\nef\n")
    (error,) = errors_of(path)
    assert (error.line, error.field) == (2, "prompt") and "NUL" in error.reason


@pytest.mark.parametrize("control", ["\x04", "\x1b", "\x7f", "\x0c"])
def test_a_prompt_with_a_control_character_is_refused(tmp_path, control):
    """Never typed: a one-word UTF-16 file without a BOM or line break reads
    as valid UTF-8 with a U+0004 after each Cyrillic letter, and was bought
    as a video of that garble (review 141). Tabs stay a prompt's own."""
    (error,) = errors_of(write(tmp_path, "p.txt", f"fine\tprompt\nbad{control}prompt\n"))
    assert (error.line, error.field) == (2, "prompt")
    assert error.reason == f"contains a control character (U+{ord(control):04X})"
    path = tmp_path / "word.txt"
    path.write_bytes("кошка".encode("utf-16-le"))
    assert "contains a control character (U+0004)" in str(errors_of(path)[0])
