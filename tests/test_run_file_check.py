"""`vidq run`'s check that the batch its file's name makes is not another
file's batch, on a real redis-server. A file is taken for a rerun (renamed
or moved) only if the batch holds exactly its prompts, each with the same
parameters: review 145 broke a first version that looked at whether the
file's first 20 job ids existed, so a file sharing prompts (or explicit
ids) with another joined that other's batch."""
from __future__ import annotations

import json
import time

import pytest
from conftest import write_prompts

DEFAULTS = {"model": "alibaba/wan2.1-t2v-turbo"}


def _admission(redis_url):
    from producer.enqueue import open_admission
    from worker.settings import Settings
    return open_admission(Settings.from_env({"VIDQ_REDIS_URL": redis_url}))


def _enqueue_as_run(admission, path):
    from producer.prompts import load_prompts
    admission.enqueue("batch", [(job.job_id, job.request, {"file": str(path)})
                                for job in load_prompts(path, DEFAULTS).jobs], time.time())


def test_a_file_sharing_its_first_20_prompts_with_another_is_refused(redis_url, tmp_path):
    """東京.txt: 30 prompts. 大阪.txt (another file, same batch name `batch`):
    the same first 20 (a shared set of warm-up/reference prompts), then 10
    of its own. Its first 20 ids are all in the batch, so the check returns
    "rerun" and `vidq run 大阪.txt` adds its 10 prompts to 東京's batch: the
    review 139 harm (its summary, exit status, manifest and --retry cover
    the other file's jobs) is back. Before 159f311 it was refused: no job of
    the batch came from a file named 大阪.txt."""
    from producer.run import _refuse_another_files_batch
    from worker.errors import InputError

    admission = _admission(redis_url)
    shared = [f"reference shot {i}" for i in range(20)]
    tokyo = write_prompts(tmp_path / "東京.txt", shared + [f"tokyo {i}" for i in range(10)])
    osaka = write_prompts(tmp_path / "大阪.txt", shared + [f"osaka {i}" for i in range(10)])
    _enqueue_as_run(admission, tokyo)
    with pytest.raises(InputError, match="holds the prompts of"):
        _refuse_another_files_batch(admission, "batch", osaka, DEFAULTS)


def test_a_small_file_all_of_whose_prompts_another_has_is_refused(redis_url,
                                                                          tmp_path):
    """大阪.txt has one prompt, which 東京.txt (already run as `batch`) also
    has. Accepted as a rerun of 東京.txt: `vidq run 大阪.txt` then waits for
    and reports 東京.txt's whole batch, and with --retry re-buys 東京.txt's
    failures. 751223e's own example (a prompt both files share made
    大阪.txt's run look like a rerun of 東京.txt's), back."""
    from producer.run import _refuse_another_files_batch
    from worker.errors import InputError

    admission = _admission(redis_url)
    tokyo = write_prompts(tmp_path / "東京.txt", ["a red fox in the snow", "a tram at night"])
    osaka = write_prompts(tmp_path / "大阪.txt", ["a red fox in the snow"])
    _enqueue_as_run(admission, tokyo)
    with pytest.raises(InputError, match="holds the prompts of"):
        _refuse_another_files_batch(admission, "batch", osaka, DEFAULTS)


def test_explicit_ids_of_another_file_are_not_a_rerun(redis_url, tmp_path):
    """JSONL files that number their rows ("id": "1", "2", ...) share every id.
    大阪.jsonl, different prompts under the same ids: the check takes it for a
    rerun (it compares ids, not requests), and the run fails later on
    enqueue's "different parameters" conflicts instead of the refusal that
    says the batch is another file's and to use --batch."""
    from producer.run import _refuse_another_files_batch
    from worker.errors import InputError

    admission = _admission(redis_url)
    tokyo = tmp_path / "東京.jsonl"
    tokyo.write_text("".join(json.dumps({"id": str(i), "prompt": f"tokyo scene {i}"}) + "\n"
                             for i in range(1, 4)), encoding="utf-8")
    osaka = tmp_path / "大阪.jsonl"
    osaka.write_text("".join(json.dumps({"id": str(i), "prompt": f"osaka scene {i}"}) + "\n"
                             for i in range(1, 4)), encoding="utf-8")
    _enqueue_as_run(admission, tokyo)
    with pytest.raises(InputError, match="holds the prompts of"):
        _refuse_another_files_batch(admission, "batch", osaka, DEFAULTS)
