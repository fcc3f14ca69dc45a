"""docker-compose.yml is valid and agrees with the code (Docker does not run here)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from worker.celery_app import QUEUES, app
from worker.posting import SHUTDOWN_WAIT_S
from worker.settings import ENV_NAMES, Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict = COMPOSE["services"]
# ${NAME}, ${NAME:-default}, ${NAME:?message}; `$$` escapes are not references.
REFERENCE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")
SECRET_NAME = re.compile(r"KEY|PASSWORD|SECRET|TOKEN|AUTH", re.I)


def _one_shot() -> set[str]:
    """Tools (profile "tools") and services others wait for to complete."""
    names = {name for name, spec in SERVICES.items() if "tools" in spec.get("profiles", [])}
    for spec in SERVICES.values():
        for dep, cond in (spec.get("depends_on") or {}).items():
            if cond.get("condition") == "service_completed_successfully":
                names.add(dep)
    return names


LONG_RUNNING = set(SERVICES) - _one_shot()


def _worker_pools() -> dict[str, list[str]]:
    return {name: spec["command"] for name, spec in SERVICES.items()
            if spec.get("command", [])[:4] == ["celery", "-A", "worker", "worker"]}


def _strings(node, path=""):
    """(path, value) of every string in the parsed file (comments excluded)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item, path)
    elif isinstance(node, str):
        yield path, node


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_file_passes_the_compose_schema():
    """The compose file validates against the Compose specification, offline."""
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(ROOT / "docker-compose.yml")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_worker_image_consumes_every_vidq_queue():
    """The image's default command consumes every queue the tasks are routed to."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert ",".join(QUEUES) in dockerfile


def test_image_is_slim_runs_as_non_root_and_bakes_no_secret():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+-slim\b", dockerfile, re.M)
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
    for line in re.findall(r"^(?:ENV|ARG)\s+(.*)$", dockerfile, re.M):
        assert not SECRET_NAME.search(line), line


def test_every_long_running_service_is_restarted_unless_stopped():
    """A worker that exits (or Redis) comes back on its own; one-shot tools do not."""
    assert {"redis", "worker-submit", "worker-poll", "worker-download", "worker-webhook",
            "flower", "minio", "sandbox"} <= LONG_RUNNING
    for name in LONG_RUNNING:
        assert SERVICES[name].get("restart") == "unless-stopped", name
    for name in set(SERVICES) - LONG_RUNNING:
        assert SERVICES[name].get("restart", "no") == "no", name


def test_every_long_running_service_has_a_healthcheck():
    for name in LONG_RUNNING:
        check = SERVICES[name].get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), name


def test_each_worker_pool_consumes_exactly_its_queue_and_together_all_of_them():
    pools = _worker_pools()
    assert set(pools) == {"worker-submit", "worker-poll", "worker-download", "worker-webhook"}
    consumed = []
    for name, command in pools.items():
        queues = command[command.index("-Q") + 1].split(",")
        assert queues == [f"vidq.{name.removeprefix('worker-')}"], name
        consumed += queues
    assert sorted(consumed) == sorted(QUEUES)


def test_worker_pools_scale_and_ping_their_own_node():
    """`--scale` needs no container_name and no fixed host port; the healthcheck
    pings this container's node (celery@<hostname>), not any worker."""
    for name in _worker_pools():
        spec = SERVICES[name]
        assert "container_name" not in spec and not spec.get("ports"), name
        assert "deploy" not in spec or "replicas" not in spec["deploy"], name
        test = " ".join(spec["healthcheck"]["test"])
        # `$$` is compose's escape: the shell in the container expands $HOSTNAME
        assert "inspect ping" in test and "-d celery@$$HOSTNAME" in test, name


def test_workers_outlive_their_soft_shutdown_when_stopped():
    soft = app.conf.worker_soft_shutdown_timeout
    assert soft == pytest.approx(10.0)
    for name in _worker_pools():
        assert _seconds(SERVICES[name]["stop_grace_period"]) > soft + SHUTDOWN_WAIT_S, name
    # SIGTERM lets a submit wait out its POST's deadline, then its pool child
    # waits for a late answer: both, or a paid id is lost to SIGKILL.
    assert (_seconds(SERVICES["worker-submit"]["stop_grace_period"])
            > Settings().post_deadline_s + SHUTDOWN_WAIT_S)


def test_redis_has_a_memory_limit_for_noeviction_to_apply():
    command = SERVICES["redis"]["command"]
    assert command[command.index("--maxmemory") + 1] == "${REDIS_MAXMEMORY:-2gb}"


def test_redis_is_durable_never_evicts_and_needs_a_password():
    redis = SERVICES["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert re.search(r"--requirepass \$\{REDIS_PASSWORD:\?[^}]+\}", command)
    assert "REDISCLI_AUTH" in redis["environment"] or " -a " in " ".join(redis["healthcheck"]["test"])
    url = COMPOSE["x-vidq-env"]["VIDQ_REDIS_URL"]
    assert url.startswith("redis://:${REDIS_PASSWORD") and url.endswith("@redis:6379/0")
    for name in _worker_pools():
        assert SERVICES[name]["environment"]["VIDQ_REDIS_URL"] == url


def test_no_port_is_published_beyond_localhost():
    assert not SERVICES["redis"].get("ports")
    for name, spec in SERVICES.items():
        for port in spec.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), (name, port)


def test_no_secret_literal_in_the_compose_file():
    """Passwords and keys are ${VAR} references without defaults, never values."""
    for path, value in _strings(COMPOSE):
        name = path.rsplit(".", 1)[-1]
        if SECRET_NAME.search(name) and name != "REDISCLI_AUTH" or name.endswith(
                ("_USER", "ACCESS_KEY_ID")):
            # the whole value is made of ${...} references (and separators)
            assert REFERENCE.sub("", value).strip(":@/") == "", (path, value)
        for match in REFERENCE.finditer(value):
            var, op, default = match.groups()
            if SECRET_NAME.search(var) and var != "FLOWER_USER":
                assert op in (None, ":?", "?"), (path, var, "a secret must have no default")
    assert "--basic-auth=" not in COMPOSE_TEXT.replace("--basic-auth=${", "")
    assert not re.search(r"sk-[A-Za-z0-9]{16,}|AKIA[0-9A-Z]{16}|minioadmin", COMPOSE_TEXT)


def test_flower_is_authenticated_persistent_and_bounded():
    flower = SERVICES["flower"]
    command = flower["command"]
    basic_auth = flower["environment"].get("FLOWER_BASIC_AUTH", "")
    assert any(arg.startswith("--basic-auth=${") for arg in command) or re.fullmatch(
        r"\$\{FLOWER_USER[^}]*\}:\$\{FLOWER_PASSWORD:\?[^}]+\}", basic_auth)
    assert "--persistent=True" in command
    assert "--db=/data/flower.db" in command and "--state_save_interval=60000" in command
    assert any(v.startswith("flower-data:/data") for v in flower["volumes"])
    max_tasks = [int(a.split("=", 1)[1]) for a in command if a.startswith("--max-tasks=")]
    # 250 MB per 20,000 tasks: the chosen window must fit the container's memory.
    assert max_tasks and max_tasks[0] >= 20_000 and max_tasks[0] / 20_000 * 250 < 2048
    assert flower["mem_limit"] == "2g"
    assert "/healthcheck" in " ".join(flower["healthcheck"]["test"])
    assert not any(key.startswith("FLOWER_") and key != "FLOWER_BASIC_AUTH"
                   for key in flower["environment"]), "Flower rejects unknown FLOWER_* names"


def test_workers_store_videos_in_minio_by_default():
    env = COMPOSE["x-vidq-env"]
    match = re.fullmatch(r"\$\{VIDQ_STORAGE_URL:-(s3://([^/}]+)/[^}]+)\}", env["VIDQ_STORAGE_URL"])
    assert match, env["VIDQ_STORAGE_URL"]
    bucket = match.group(2)
    assert env["AWS_ENDPOINT_URL"] == "${AWS_ENDPOINT_URL:-http://minio:9000}"
    for name in _worker_pools():
        depends = SERVICES[name]["depends_on"]
        assert depends["minio-init"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
    init = SERVICES["minio-init"]
    assert init["image"].split(":")[0].endswith("minio/mc")
    assert f"mc mb --ignore-existing vidq/{bucket}" in " ".join(init["entrypoint"])
    assert SERVICES["minio"]["environment"]["MINIO_ROOT_USER"].startswith("${AWS_ACCESS_KEY_ID")


def test_sandbox_runs_only_under_its_profile():
    assert SERVICES["sandbox"]["profiles"] == ["sandbox"]
    assert SERVICES["producer"]["profiles"] == ["tools"]


def test_env_example_lists_every_variable_compose_uses_and_every_setting():
    listed = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.M))
    used = {m.group(1) for _, value in _strings(COMPOSE) for m in REFERENCE.finditer(value)}
    assert used <= listed, sorted(used - listed)
    assert set(ENV_NAMES.values()) <= listed, sorted(set(ENV_NAMES.values()) - listed)
    # every setting reaches the workers (VIDQ_REDIS_URL is built from REDIS_PASSWORD)
    passed = set(COMPOSE["x-vidq-env"])
    assert set(ENV_NAMES.values()) <= passed, sorted(set(ENV_NAMES.values()) - passed)


def test_flower_gets_no_secret_it_does_not_need():
    environment = SERVICES["flower"]["environment"]
    for secret in ("AIMLAPI_KEY", "AWS_SECRET_ACCESS_KEY", "VIDQ_WEBHOOK_SECRET"):
        assert secret not in environment, secret
    assert "VIDQ_REDIS_URL" in environment and "FLOWER_BASIC_AUTH" in environment
