"""What `pip install vidq` (not editable) gets: a wheel built from this
checkout, installed in a fresh virtualenv, runs `vidq` from a directory
without the source. The Lua scripts were left out of the package (only the
sandbox's JSON was package data), so every command of an installed copy,
the Docker image's `vidq` included, failed with FileNotFoundError, while
the editable install the tests use read them from the checkout (review 142)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_an_installed_wheel_runs_vidq_outside_the_checkout(redis_url, tmp_path):
    # From a copy: a build/ left in the checkout by an earlier build would
    # hand setuptools files the package no longer declares.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".*_cache", ".vidq", "results"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(source)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("vidq-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    assert {f"worker/lua/{p.name}" for p in (ROOT / "worker" / "lua").glob("*.lua")} <= packaged

    # The dependencies come from this environment; vidq only from the wheel.
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=False)
    python = tmp_path / "venv" / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", str(wheel)], check=True, timeout=300, env=env)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "p.txt").write_text("a lighthouse in fog\n")
    env["VIDQ_REDIS_URL"] = redis_url

    def vidq(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(tmp_path / "venv" / "bin" / "vidq"), *args], cwd=elsewhere,
                              env=env, capture_output=True, text=True, timeout=120)

    where = subprocess.run([str(python), "-c", "import worker; print(worker.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(tmp_path / "venv")), where.stdout
    enqueued = vidq("enqueue", "p.txt", "--batch", "night")
    assert enqueued.returncode == 0, enqueued.stderr
    assert "batch night: 1 job (1 new, 0 already enqueued)" in enqueued.stdout
    status = vidq("status", "night")
    assert status.returncode == 0 and status.stdout.startswith("night: 0/1 ended"), status
