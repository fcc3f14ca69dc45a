"""What deploy/'s kustomizations use of kustomize, applied in Python, for a
machine with neither kubectl nor kustomize: resources (recursively), labels
(on metadata only), images, patches (a strategic merge of maps, matched by
kind and name; or JSON 6902 `replace`/`add` operations on the targets a
regex names) and namespace. Anything else in a kustomization is refused, so
a new feature cannot be silently skipped. On both trees it gave exactly
`kubectl kustomize`'s objects when written; `test_deploy.py::
test_the_production_overlay_is_applied` checks the overlay's effects
with either."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

HANDLED = {"apiVersion", "kind", "resources", "labels", "images", "patches", "namespace"}
CLUSTER_SCOPED = {"Namespace"}


def render(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - HANDLED
    if unknown:
        raise AssertionError(f"{directory}: rendering {sorted(unknown)} by hand is not "
                             "written; install kubectl")
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else [
            doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for label in kustomization.get("labels", []):
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
    for image in kustomization.get("images", []):
        _set_image(objects, image)
    for patch in kustomization.get("patches", []):
        _patch(directory, objects, patch)
    if namespace := kustomization.get("namespace"):
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    return objects


def _set_image(objects: list[dict], image: dict) -> None:
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"


def _patch(directory: Path, objects: list[dict], patch: dict) -> None:
    if "path" in patch:
        change = yaml.safe_load((directory / patch["path"]).read_text())
        (target,) = [obj for obj in objects if (obj["kind"], obj["metadata"]["name"]) == (
            change["kind"], change["metadata"]["name"])]
        _merge(target, change)
        return
    target = patch["target"]
    chosen = [obj for obj in objects if obj["kind"] == target["kind"]
              and obj["apiVersion"] == f"{target['group']}/{target['version']}"
              and re.fullmatch(target["name"], obj["metadata"]["name"])]
    assert chosen, f"patch target {target} matches nothing"
    for obj in chosen:
        for operation in yaml.safe_load(patch["patch"]):
            _json6902(obj, operation)


def _merge(into: dict, change: dict) -> None:
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def _json6902(obj: dict, operation: dict) -> None:
    assert operation["op"] in ("replace", "add"), f"op {operation['op']} is not written"
    *parents, last = [part.replace("~1", "/").replace("~0", "~")
                      for part in operation["path"].lstrip("/").split("/")]
    node = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = operation["value"]
    else:
        if operation["op"] == "replace":
            assert last in node, f"replace of missing {operation['path']}"
        node[last] = operation["value"]
