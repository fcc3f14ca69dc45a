"""`vidq report` on a real batch: real Redis, real workers, the sandbox upstream."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from datetime import datetime
from pathlib import Path

from conftest import write_prompts

PROMPTS = ["# night shots", "a red fox in the snow", "", "a blue whale at dawn",
           "REJECT this one please", "a green frog on a leaf — café / 夜"]
GOOD = {"a red fox in the snow": 2, "a blue whale at dawn": 4, "a green frog on a leaf — café / 夜": 6}
TIMINGS = ("enqueued_at", "submitted_at", "completed_at", "downloaded_at", "failed_at")


def vidq(pipeline, *args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "VIDQ_REDIS_URL": pipeline.settings.redis_url,
           "VIDQ_STORAGE_URL": pipeline.env["VIDQ_STORAGE_URL"]}
    return subprocess.run(["vidq", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def test_a_batch_enqueued_from_two_files_names_each_rows_file(make_pipeline, tmp_path):
    """Two files enqueued into one batch both have a line 1: the rows (and so
    the manifest) said `line` only, and a content pipeline could not tell
    which prompt file a video answers (helper 107). Each row names its file,
    as given to `vidq enqueue`. A manifest written before that column existed
    is still reported (the column empty)."""
    pipeline = make_pipeline()  # no workers: the jobs wait in line
    write_prompts(tmp_path / "owls.txt", ["an owl at dusk", "an owl at dawn"])
    write_prompts(tmp_path / "moths.txt", ["a moth at a lamp"])
    for name in ("owls.txt", "moths.txt"):
        enqueued = vidq(pipeline, "enqueue", name, "--batch", "two", cwd=tmp_path)
        assert enqueued.returncode == 0, enqueued.stderr

    report = vidq(pipeline, "report", "two")
    rows = [json.loads(line) for line in report.stdout.splitlines()]
    assert sorted((row["file"], row["line"], row["prompt"]) for row in rows) == [
        ("moths.txt", 1, "a moth at a lamp"), ("owls.txt", 1, "an owl at dusk"),
        ("owls.txt", 2, "an owl at dawn")]
    table = list(csv.DictReader(io.StringIO(vidq(pipeline, "report", "two", "--format",
                                                 "csv").stdout)))
    assert sorted((row["file"], row["line"]) for row in table) == [
        ("moths.txt", "1"), ("owls.txt", "1"), ("owls.txt", "2")]

    videos = Path(pipeline.settings.storage_url.removeprefix("file://"))
    (videos / "older").mkdir(parents=True)
    (videos / "older" / "manifest.jsonl").write_text(json.dumps(
        {"custom_id": "a", "line": 1, "prompt": "an old row", "state": "done"}) + "\n")
    older = vidq(pipeline, "report", "older", "--format", "csv")
    assert older.returncode == 0, older.stderr
    [row] = list(csv.DictReader(io.StringIO(older.stdout)))
    assert row["prompt"] == "an old row" and row["file"] == ""


def test_report_rows_match_the_batch(make_pipeline, tmp_path):
    """JSONL and CSV reports: one row per job with its input line, the stored
    video's URL and sha256 (as in the sidecar and the upstream's ledger), the
    upstream's error for the rejected prompt, ISO-8601 timings; --state filters;
    an unknown batch or state exits 2 with one line."""
    pipeline = make_pipeline()
    pipeline.start_workers()
    pipeline.enqueue(write_prompts(tmp_path / "p.txt", PROMPTS), "night")
    counts = pipeline.wait_finished("night", timeout_s=60)
    assert counts["done"] == 3 and counts["failed"] == 1

    result = vidq(pipeline, "report", "night", "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 4
    assert [row["line"] for row in rows] == [2, 4, 5, 6]  # input-line order
    assert {row["file"] for row in rows} == {str(tmp_path / "p.txt")}
    ledger = {entry["id"]: entry for entry in pipeline.ledger()}
    videos = Path(pipeline.settings.storage_url.removeprefix("file://"))
    for row in rows:
        assert PROMPTS[row["line"] - 1] == row["prompt"]
        assert row["model"] == "alibaba/wan2.1-t2v-turbo"
        assert row["parameters"]["resolution"] == "720P"
        assert row["parameters"]["aspect_ratio"] == "16:9"
        assert row["generation_ids"] == [row["generation_id"]] and row["siblings"] == []
        assert row["attempts"] == 0 and row["polls"] >= 1 and row["outcome_unknown"] is False
        for name in ("enqueued_at", "submitted_at"):
            assert datetime.fromisoformat(row[name]).utcoffset().total_seconds() == 0
        if row["state"] == "done":
            sidecar = json.loads((videos / "night" / f"{row['custom_id']}.json").read_text())
            assert row["sha256"] == sidecar["sha256"] == ledger[row["generation_id"]]["sha256"]
            assert row["storage_url"] == f"{pipeline.settings.storage_url}/night/{row['custom_id']}.mp4"
            assert row["credits_used"] == sidecar["credits_used"]
            assert datetime.fromisoformat(row["downloaded_at"]) >= datetime.fromisoformat(row["enqueued_at"])
            assert row["error"] is None and row["failed_at"] is None
        else:
            assert row["state"] == "failed" and row["line"] == 5
            assert "blocked term" in row["error"] and row["sha256"] is None
            assert ledger[row["generation_id"]]["status"] == "error"
            datetime.fromisoformat(row["failed_at"])
    assert {row["prompt"] for row in rows if row["state"] == "done"} == set(GOOD)

    as_csv = vidq(pipeline, "report", "night", "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    table = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert len(table) == 4
    by_id = {row["custom_id"]: row for row in rows}
    for row in table:
        assert int(row["line"]) == by_id[row["custom_id"]]["line"]
        assert row["sha256"] == (by_id[row["custom_id"]]["sha256"] or "")
        assert json.loads(row["parameters"]) == by_id[row["custom_id"]]["parameters"]
        for name in TIMINGS:
            if row[name]:
                datetime.fromisoformat(row[name])

    failed = vidq(pipeline, "report", "night", "--state", "failed", "--output",
                  str(tmp_path / "failed.jsonl"))
    assert failed.returncode == 0, failed.stderr
    failed_rows = (tmp_path / "failed.jsonl").read_text().splitlines()
    assert len(failed_rows) == 1 and json.loads(failed_rows[0])["line"] == 5

    unknown = vidq(pipeline, "report", "no-such-batch")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert unknown.stderr.strip().splitlines() == ["error: no batch named 'no-such-batch'"]
    bad_state = vidq(pipeline, "report", "night", "--state", "finished")
    assert bad_state.returncode == 2 and "not a job state" in bad_state.stderr
    assert len(bad_state.stderr.strip().splitlines()) == 1
