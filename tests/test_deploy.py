"""deploy/ renders offline, validates against the Kubernetes and KEDA schemas,
and says what the README promises (Kubernetes does not run here)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import kustomize_by_hand
import pytest
import yaml

from worker import keys
from worker.admission import PRIORITIES
from worker.celery_app import QUEUES, app
from worker.posting import SHUTDOWN_WAIT_S
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = ["base", "overlays/production"]
K8S_VERSION = "1.30"
POOLS = {queue.removeprefix("vidq."): queue for queue in QUEUES}
# Batches with jobs waiting for admission, one list per priority (an entry is a batch).
RINGS = {keys.ring(priority) for priority in PRIORITIES}
SECRET_NAME = re.compile(r"KEY|PASSWORD|SECRET|TOKEN|AUTH", re.I)
KEDA_SCHEMAS = {"ScaledObject": "keda-scaledobject.json",
                "TriggerAuthentication": "keda-triggerauthentication.json"}


def _tool() -> list[str] | None:
    for tool in (["kubectl", "kustomize"], ["kustomize", "build"]):
        if shutil.which(tool[0]):
            return tool
    return None


@cache
def render(name: str) -> tuple[dict, ...]:
    """The objects `kubectl apply -k` would get; without kubectl or kustomize,
    rendered by hand (patches, images and namespace applied: the overlay's
    tests would otherwise check the base's objects; helper 106)."""
    directory = DEPLOY / name
    if tool := _tool():
        result = subprocess.run([*tool, str(directory)], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)
    return tuple(kustomize_by_hand.render(directory))


def test_the_production_overlay_is_applied():
    """What overlays/production declares is in its objects, rendered by
    kubectl or, without it, by hand: the namespace, the released image, its
    ConfigMap values and TLS on every KEDA trigger (helper 106)."""
    overlay = DEPLOY / "overlays" / "production"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    values = yaml.safe_load((overlay / "config.yaml").read_text())["data"]
    (image,) = kustomization["images"]
    objects = render("overlays/production")
    pods = [obj["spec"]["template"]["spec"] for obj in objects if obj["kind"] == "Deployment"]
    triggers = [trigger for scaled in kind("overlays/production", "ScaledObject").values()
                for trigger in scaled["spec"]["triggers"]]

    assert {obj["metadata"].get("namespace") for obj in objects
            if obj["kind"] != "Namespace"} == {kustomization["namespace"]}
    assert {container["image"] for pod in pods for container in pod["containers"]} == {
        f"{image['newName']}:{image['newTag']}"}
    assert values.items() <= kind("overlays/production", "ConfigMap")["vidq-config"][
        "data"].items()
    assert triggers and {trigger["metadata"]["enableTLS"] for trigger in triggers} == {"true"}


def kind(name: str, wanted: str) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for obj in render(name) if obj["kind"] == wanted}


def pool_deployments(name: str) -> dict[str, dict]:
    deployments = kind(name, "Deployment")
    return {pool: deployments[f"vidq-worker-{pool}"] for pool in POOLS}


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def config_value(name: str, key: str) -> str:
    return kind(name, "ConfigMap")["vidq-config"]["data"][key]


def _rendered_with_kustomize() -> bool:
    return bool(shutil.which("kubectl") or shutil.which("kustomize"))


parametrize_kustomizations = pytest.mark.parametrize("name", KUSTOMIZATIONS)


@parametrize_kustomizations
def test_core_objects_pass_the_kubernetes_schema_strictly(name):
    core = [obj for obj in render(name) if obj["kind"] not in KEDA_SCHEMAS]
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= {o["kind"] for o in core}
    for obj in core:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc}")


@parametrize_kustomizations
def test_keda_objects_pass_the_schema_kept_from_kedas_crds(name):
    objects = [obj for obj in render(name) if obj["kind"] in KEDA_SCHEMAS]
    assert {o["kind"] for o in objects} == set(KEDA_SCHEMAS)
    for obj in objects:
        schema = json.loads((DEPLOY / "schemas" / KEDA_SCHEMAS[obj["kind"]]).read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        jsonschema.validate(obj, schema)


def test_the_keda_schema_refuses_what_the_crd_refuses():
    schema = json.loads((DEPLOY / "schemas" / "keda-scaledobject.json").read_text())
    good = kind("base", "ScaledObject")["vidq-worker-submit"]
    for broken in (
        {**good, "spec": {**good["spec"], "scaleTargetRef": {}}},
        {**good, "spec": {**good["spec"], "maxReplicaCount": "3"}},
        {**good, "spec": {**good["spec"], "triggers": [{"type": "redis",
                                                        "metadata": {"listLength": 5}}]}},
        {**good, "spec": {**good["spec"], "minReplicas": 0}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


@parametrize_kustomizations
def test_each_pool_deployment_consumes_exactly_its_queue(name):
    consumed = []
    for pool, deployment in pool_deployments(name).items():
        command = container(deployment)["command"]
        assert command[:4] == ["celery", "-A", "worker", "worker"]
        queues = command[command.index("-Q") + 1].split(",")
        assert queues == [POOLS[pool]], pool
        consumed += queues
    assert sorted(consumed) == sorted(QUEUES)


@parametrize_kustomizations
def test_workers_outlive_their_soft_shutdown(name):
    soft = app.conf.worker_soft_shutdown_timeout
    assert soft == pytest.approx(10.0)
    for pool, deployment in pool_deployments(name).items():
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > soft + SHUTDOWN_WAIT_S, pool
    submit = pool_deployments(name)["submit"]["spec"]["template"]["spec"]
    assert submit["terminationGracePeriodSeconds"] > Settings().post_deadline_s + SHUTDOWN_WAIT_S


@parametrize_kustomizations
def test_a_redis_outage_of_an_hour_restarts_no_worker(name):
    """The liveness ping needs Redis; a worker rides out a Redis outage or a
    full Redis by itself, and a restart would kill pool children still
    recording a paid id."""
    for pool, deployment in pool_deployments(name).items():
        probe = container(deployment)["livenessProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 3600, pool


@parametrize_kustomizations
def test_every_container_has_requests_limits_and_probes(name):
    for deployment in kind(name, "Deployment").values():
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            where = f"{deployment['metadata']['name']}/{c['name']}"
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), where
            assert "livenessProbe" in c and "readinessProbe" in c, where


@parametrize_kustomizations
def test_worker_probes_ping_this_worker_with_a_generous_timeout(name):
    for pool, deployment in pool_deployments(name).items():
        c = container(deployment)
        assert "--hostname=celery@$(POD_NAME)" in c["command"], pool
        assert any(e["name"] == "POD_NAME" and e["valueFrom"]["fieldRef"]["fieldPath"]
                   == "metadata.name" for e in c["env"]), pool
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            p = c[probe]
            line = " ".join(p["exec"]["command"])
            assert 'celery -A worker inspect ping -d "celery@$POD_NAME"' in line, (pool, probe)
            assert p["timeoutSeconds"] >= 20, (pool, probe)


@parametrize_kustomizations
def test_every_secret_value_comes_from_a_secret(name):
    """Secret-looking variables come from secretKeyRef; the rest from the ConfigMap;
    no Secret object ships (it is made with `kubectl create secret`), and every key
    referenced is in deploy/README.md's command."""
    assert not kind(name, "Secret")
    readme = (DEPLOY / "README.md").read_text()
    documented = set(re.findall(r"--from-literal=([A-Z_]+)=", readme))
    referenced = set()
    for deployment in kind(name, "Deployment").values():
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            for env in c.get("env", []):
                if env["name"] in ("AIMLAPI_KEY", "VIDQ_REDIS_URL") or SECRET_NAME.search(env["name"]):
                    assert "value" not in env, env
                    ref = env["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == "vidq-secrets"
                    referenced.add(ref["key"])
            for source in c.get("envFrom", []):
                assert "configMapRef" in source, source
    for auth in kind(name, "TriggerAuthentication").values():
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["name"] == "vidq-secrets"
            referenced.add(ref["key"])
    assert {"AIMLAPI_KEY", "VIDQ_REDIS_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "FLOWER_BASIC_AUTH", "REDIS_PASSWORD"} <= referenced
    assert referenced <= documented, sorted(referenced - documented)
    for key, value in kind(name, "ConfigMap")["vidq-config"]["data"].items():
        assert not SECRET_NAME.search(key) and "@" not in value, key


def test_no_secret_literal_anywhere_in_deploy():
    patterns = [
        r"sk-[A-Za-z0-9_-]{16,}",                       # API keys
        r"AKIA[0-9A-Z]{16}",                            # AWS access key ids
        r"rediss?://[^\s:@/]*:[^\s@$\"'{]+@",           # a Redis URL with a literal password
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
        r"(?i)\b(password|secret|api_?key)\s*[:=]\s*[\"']?[A-Za-z0-9+/]{8,}",
        r"(?im)^\s*(data|stringData):\s*$(?=[\s\S]*kind:\s*Secret)",
    ]
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".json")]
    assert files
    for path in files:
        text = path.read_text()
        for pattern in patterns:
            assert not re.search(pattern, text), (path, pattern)


@parametrize_kustomizations
def test_a_disruption_budget_covers_each_pool(name):
    budgets = list(kind(name, "PodDisruptionBudget").values())
    for pool, deployment in pool_deployments(name).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets
                    if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, pool
        assert covering[0]["spec"].get("maxUnavailable") == 1, pool


@parametrize_kustomizations
def test_a_scaled_object_per_pool_targets_its_deployment_and_queue(name):
    scaled = kind(name, "ScaledObject")
    auths = kind(name, "TriggerAuthentication")
    deployments = kind(name, "Deployment")
    targets = {}
    for obj in scaled.values():
        target = obj["spec"]["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment"
        assert target["name"] in deployments
        targets[target["name"]] = obj
    for pool in POOLS:
        obj = targets[f"vidq-worker-{pool}"]
        triggers = obj["spec"]["triggers"]
        lists = {t["metadata"]["listName"] for t in triggers}
        assert all(t["type"] == "redis" for t in triggers)
        assert all(t["authenticationRef"]["name"] in auths for t in triggers)
        assert all(t["metadata"]["databaseIndex"] == "0" for t in triggers)
        # the step pools also wake when batches wait for admission; the webhook
        # pool wakes on its own queue only (a delivery is made after its event)
        assert ({POOLS[pool]} if pool == "webhook" else {*RINGS, POOLS[pool]}) == lists, pool
        # the poll pool keeps one worker: it holds the countdown polls and reconciles
        # poll holds the countdowns; a running download is not in its queue
        assert obj["spec"]["minReplicaCount"] == (1 if pool in ("poll", "download") else 0), pool


@parametrize_kustomizations
def test_pool_ceilings_come_from_c_not_from_the_backlog(name):
    """No pool runs more worker processes than there are generations in flight (C)."""
    c = int(config_value(name, "VIDQ_MAX_IN_FLIGHT"))
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o for o in kind(name, "ScaledObject").values()}
    for pool, deployment in pool_deployments(name).items():
        command = container(deployment)["command"]
        concurrency = int(command[command.index("-c") + 1])
        maximum = scaled[deployment["metadata"]["name"]]["spec"]["maxReplicaCount"]
        assert 1 <= maximum * concurrency <= c, pool


@parametrize_kustomizations
def test_flower_is_authenticated_persistent_probed_and_served(name):
    flower = kind(name, "Deployment")["vidq-flower"]
    c = container(flower)
    assert "--persistent=True" in c["command"] and "--db=/data/flower.db" in c["command"]
    assert any(a.startswith("--max-tasks=") for a in c["command"])
    auth = next(e for e in c["env"] if e["name"] == "FLOWER_BASIC_AUTH")
    assert auth["valueFrom"]["secretKeyRef"]["name"] == "vidq-secrets"
    assert any(m["mountPath"] == "/data" for m in c["volumeMounts"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/healthcheck"
    service = kind(name, "Service")["vidq-flower"]
    labels = flower["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_production_overlay_uses_its_namespace_image_and_tls():
    if not _rendered_with_kustomize():
        # No kustomize here: check what the overlay asks for, by hand.
        overlay = yaml.safe_load((DEPLOY / "overlays/production/kustomization.yaml").read_text())
        assert overlay["namespace"] == "vidq"
        assert overlay["images"] == [{"name": "vidq", "newName": "registry.example.com/vidq",
                                      "newTag": overlay["images"][0]["newTag"]}]
        tls = next(p for p in overlay["patches"] if p.get("target", {}).get("kind") == "ScaledObject")
        ops = yaml.safe_load(tls["patch"])
        for scaled in kind("base", "ScaledObject").values():
            paths = {f"/spec/triggers/{i}/metadata/enableTLS" for i in range(len(scaled["spec"]["triggers"]))}
            assert paths <= {op["path"] for op in ops if op["value"] == "true"}, scaled["metadata"]
        return
    objects = render("overlays/production")
    assert all(o["metadata"].get("namespace") == "vidq" for o in objects if o["kind"] != "Namespace")
    for deployment in kind("overlays/production", "Deployment").values():
        assert container(deployment)["image"].startswith("registry.example.com/vidq:")
    for obj in kind("overlays/production", "ScaledObject").values():
        assert all(t["metadata"]["enableTLS"] == "true" for t in obj["spec"]["triggers"])
