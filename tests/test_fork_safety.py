"""Pool children are forked from a worker's main process while its threads run
(the start-up storage check). A module one of those threads is importing at that
moment stays locked in the child for good. botocore calls datetime.strptime on
every S3 answer, and strptime imports `_strptime` on first use: a child forked
while the storage check made its first S3 call hung for good in its own first S3
call (`test_s3_faults.py` caught it about one run in four, py-spy showed the child
waiting on `_strptime`'s import lock). The worker imports it before anything runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_what_s3_calls_import_lazily_is_imported_with_the_worker():
    found = subprocess.run(
        [sys.executable, "-c", "import sys, worker; worker.app; print('_strptime' in sys.modules)"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})

    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "True"
