"""cluster/monitoring/: the Grafana dashboard charts exactly the metrics the project exports,
and the scrape configs point at the ports and pods the cluster scripts and manifests use."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "cluster" / "monitoring"
sys.path.insert(0, str(MONITORING))

from emit_sample_metrics import project_metrics, prometheus_names  # noqa: E402

DASHBOARD = json.loads((MONITORING / "grafana_dashboard.json").read_text())
PANELS = [panel for panel in DASHBOARD["panels"] if panel["type"] != "row"]
EXPRESSIONS = [target["expr"] for panel in PANELS for target in panel["targets"]]


def queried_series() -> set[str]:
    return {name for expr in EXPRESSIONS for name in re.findall(r"\bray_[a-z0-9_]+", expr)}


def test_project_metrics_cover_training_and_serving() -> None:
    names = {metric.info["name"] for metric in project_metrics()}
    assert {"salm_train_loss", "salm_train_tokens_per_s", "salm_train_padding_ratio"} <= names
    assert {"salm_serve_request_latency_s", "salm_serve_rtfx", "salm_serve_queue_depth"} <= names


def test_dashboard_charts_every_project_metric() -> None:
    queried = queried_series()
    uncharted = [m.info["name"] for m in project_metrics() if not set(prometheus_names(m)) & queried]
    assert not uncharted, f"metrics with no panel: {uncharted}"


def test_dashboard_queries_only_series_the_project_exports() -> None:
    exported = {name for metric in project_metrics() for name in prometheus_names(metric)}
    # A renamed metric, or a counter queried without its _total suffix, would chart nothing.
    unknown = {name for name in queried_series() if name.startswith("ray_salm_")} - exported
    assert not unknown, f"panels query series nobody exports: {sorted(unknown)}"


def test_dashboard_is_importable_grafana_json() -> None:
    assert DASHBOARD["uid"] and DASHBOARD["title"] and DASHBOARD["schemaVersion"] >= 36
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in PANELS:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)) and all(target["expr"] for target in panel["targets"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    training = [expr for expr in EXPRESSIONS if "salm_train_" in expr]
    assert all('run=~"$run"' in expr for expr in training)  # the run picker filters every training panel


def test_podmonitor_scrapes_the_metrics_port_of_every_pod_in_the_manifests() -> None:
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for manifest in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml"):
        spec = yaml.safe_load((REPO / "cluster" / "kuberay" / manifest).read_text())["spec"]
        cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            template = group["template"]
            assert selector.items() <= template["metadata"]["labels"].items(), manifest
            (container,) = template["spec"]["containers"]
            ports = {port["name"]: port["containerPort"] for port in container["ports"]}
            assert ports[endpoint["port"]] == int(group["rayStartParams"]["metrics-export-port"]), manifest


def test_local_prometheus_config_follows_the_local_clusters_service_discovery_file() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (discovery,) = job["file_sd_configs"]
    start_script = (REPO / "cluster" / "local" / "start.sh").read_text()
    default_dir = re.search(r'DIR="\$\{SALM_LOCAL_CLUSTER_DIR:-([^}]+)\}"', start_script)[1]
    # Ray's head writes this file into its temp dir (start.sh: <dir>/ray) and keeps it current.
    assert discovery["files"] == [f"{default_dir}/ray/prom_metrics_service_discovery.json"]
