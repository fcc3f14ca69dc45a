"""The Grafana dashboard, its provisioning and Prometheus's scrape config agree
with the exporter and with docker-compose.yml's `monitoring` profile (Docker
does not run here: the files are checked, the compose file is validated
against the Compose specification by tests/test_compose.py)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from producer.metrics_cmd import DEFAULT_PORT, registry_for
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "deploy" / "monitoring"
DASHBOARD = json.loads((MONITORING / "grafana" / "dashboards" / "vidq.json").read_text())
DATASOURCES = yaml.safe_load(
    (MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
PROVIDERS = yaml.safe_load(
    (MONITORING / "grafana" / "provisioning" / "dashboards" / "vidq.yml").read_text())
PROMETHEUS = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
SERVICES = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "offset", "bool", "inf", "nan"}
# What the issue asks the dashboard to show, each found in some panel's title.
REQUIRED_PANELS = ("throughput against the c line", "in flight", "backlog", "eta",
                   "errors by kind", "429", "gets per video", "detection lag", "spend")


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions,
    keywords, label names (inside {} or by/without lists) or strings."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        word, call = match.group(1), match.group(2)
        if not call and word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


def exported_names(redis_url: str) -> set[str]:
    """Every sample name the exporter's registry serves (histograms as their
    _bucket, _count and _sum series, counters with _total)."""
    registry = registry_for(Settings(redis_url=redis_url))
    names = set()
    for family in registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                    "gauge": ("",)}[family.type]
        names.update(family.name + suffix for suffix in suffixes)
    return names


def panels() -> list[dict]:
    return DASHBOARD["panels"]


def test_the_metric_name_parser_finds_names_and_skips_functions_labels_and_keywords():
    expr = ('histogram_quantile(0.95, sum by (le, call) (rate(vidq_upstream_request_seconds_bucket'
            '{outcome!="2xx", call=~"sub.*"}[5m]))) / on(call) group_left max(vidq_in_flight) > bool 0')
    assert metric_names(expr) == {"vidq_upstream_request_seconds_bucket", "vidq_in_flight"}


def test_the_dashboard_is_a_grafana_dashboard_with_panels_and_targets():
    assert DASHBOARD["uid"] and DASHBOARD["title"] and isinstance(DASHBOARD["schemaVersion"], int)
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids)) >= len(REQUIRED_PANELS)
    for panel in panels():
        assert panel["type"] in {"timeseries", "stat", "table", "gauge", "bargauge"}, panel["title"]
        assert panel["title"] and panel["description"], panel["id"]
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]


def test_every_panel_queries_the_provisioned_prometheus_datasource():
    (source,) = DATASOURCES["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    for panel in panels():
        for holder in (panel, *panel["targets"]):
            assert holder["datasource"] == {"type": "prometheus", "uid": source["uid"]}, \
                panel["title"]


def test_the_dashboard_shows_what_the_night_needs():
    titles = " | ".join(panel["title"].lower() for panel in panels())
    for wanted in REQUIRED_PANELS:
        assert wanted in titles, wanted


def test_every_query_names_only_metrics_the_exporter_exports(redis_url):
    exported = exported_names(redis_url)
    assert {"vidq_upstream_requests_total", "vidq_jobs", "vidq_in_flight",
            "vidq_detection_lag_seconds_bucket"} <= exported
    used: set[str] = set()
    for panel in panels():
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, (panel["title"], target["expr"])
            assert names <= exported, (panel["title"], sorted(names - exported))
            used |= names
    # The dashboard is not a sample of a few metrics: most families appear.
    families = {re.sub(r"_(bucket|count|sum)$", "", name) for name in exported}
    shown = {re.sub(r"_(bucket|count|sum)$", "", name) for name in used}
    assert len(shown) >= 0.75 * len(families), sorted(families - shown)


def test_prometheus_scrapes_the_exporter_service_on_its_port():
    (job,) = PROMETHEUS["scrape_configs"]
    (static,) = job["static_configs"]
    assert static["targets"] == [f"vidq-metrics:{DEFAULT_PORT}"]
    command = SERVICES["vidq-metrics"]["command"]
    assert command[:2] == ["vidq", "metrics"] and command[command.index("--port") + 1] == str(
        DEFAULT_PORT) and command[command.index("--host") + 1] == "0.0.0.0"


@pytest.mark.parametrize("name", ["vidq-metrics", "prometheus", "grafana"])
def test_the_monitoring_profile_runs_only_when_asked_and_mounts_its_files(name):
    spec = SERVICES[name]
    assert spec["profiles"] == ["monitoring"]
    for volume in spec.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith("./"):
            assert (ROOT / source).exists(), volume
            assert volume.endswith(":ro"), volume


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard_folder():
    grafana = SERVICES["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == "./deploy/monitoring/grafana/provisioning"
    (provider,) = PROVIDERS["providers"]
    assert mounts[provider["options"]["path"]] == "./deploy/monitoring/grafana/dashboards"
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_PASSWORD:?")
    prometheus = SERVICES["prometheus"]
    assert "./deploy/monitoring/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in \
        prometheus["volumes"]


def test_the_exporter_gets_redis_and_no_api_key():
    env = SERVICES["vidq-metrics"]["environment"]
    assert env["VIDQ_REDIS_URL"].endswith("@redis:6379/0")
    assert not any("KEY" in name or "AWS" in name for name in env)
