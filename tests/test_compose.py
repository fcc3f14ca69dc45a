"""docker-compose.yml is valid and agrees with the code (Docker does not run here)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from worker.celery_app import QUEUES

ROOT = Path(__file__).resolve().parents[1]


def test_compose_file_passes_the_compose_schema():
    """The compose file validates against the Compose specification, offline."""
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(ROOT / "docker-compose.yml")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_worker_image_consumes_every_vidq_queue():
    """The image's default command consumes the three queues the tasks are routed to."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert ",".join(QUEUES) in dockerfile


def test_every_long_running_service_is_restarted_unless_stopped():
    """A worker that exits (or Redis) comes back on its own; one-shot tools do not."""
    import yaml

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    long_running = {name for name, spec in services.items() if "tools" not in spec.get("profiles", [])}
    assert {"redis", "worker", "flower", "sandbox"} <= long_running
    for name in long_running:
        assert services[name].get("restart") == "unless-stopped", name
