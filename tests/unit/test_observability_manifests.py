"""The monitoring manifests: rules pass promtool, and every metric they name is exported."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import REGISTRY

from egressgw import metrics
from egressgw.metrics import EgressIPState, GatewayReport, TrafficSample
from tests.conftest import require

MONITORING = Path(__file__).parent.parent.parent / "manifests" / "monitoring"
METRIC = re.compile(r"\begressgw_[a-z_]+")


def dashboard() -> dict[str, Any]:
    body: dict[str, Any] = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return body


def rules() -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return body


def exported_names() -> set[str]:
    names = {s.name for family in REGISTRY.collect() for s in family.samples}
    suffixes = ("", "_total", "_bucket", "_count", "_sum", "_info")  # families without samples yet
    names |= {f.name + suffix for f in REGISTRY.collect() for suffix in suffixes}
    report = GatewayReport(
        learned_elements={"ns": 1},
        traffic={1: ("ns", TrafficSample())},
        egress_ips=[EgressIPState("gw", "198.51.100.1", True)],
        policies={("ns", "Enforce"): 1},
        invalid_objects={("EgressPolicy", "ns"): 1},
    )
    for family in metrics.GatewayCollector().families(report):
        names |= {family.name} | {s.name for s in family.samples}
    return names


def test_promtool_accepts_the_rule_groups(tmp_path: Path) -> None:
    require(shutil.which("promtool") is not None, "needs promtool (Debian package prometheus)")
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rules()["spec"]["groups"]}))
    proc = subprocess.run(
        ["promtool", "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 9 rules found" in proc.stdout


def test_every_alert_has_a_runbook_and_a_severity() -> None:
    for group in rules()["spec"]["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
            for key in ("summary", "description", "runbook"):
                assert rule["annotations"][key].strip(), (rule["alert"], key)


def test_dashboard_and_alerts_name_only_exported_metrics() -> None:
    used = set(METRIC.findall(json.dumps(dashboard()))) | set(METRIC.findall(json.dumps(rules())))
    exported = exported_names()
    assert sorted(used - exported) == []
    assert len(used) >= 15


def test_dashboard_panels_are_laid_out_and_queried() -> None:
    panels = [p for p in dashboard()["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard()["panels"]}) == len(dashboard()["panels"])
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    titles = {p["title"] for p in panels}
    for needed in (
        "DNS queries by verdict",
        "DNS denials by namespace",
        "Upstream latency",
        "Programming latency",
        "Allowed elements by namespace",
        "Address caps hit",
        "Packets by namespace",
        "Egress IP holders",
    ):
        assert needed in titles


def test_the_servicemonitor_scrapes_the_metrics_service_as_job_egressgw() -> None:
    root = Path(__file__).resolve().parents[2] / "manifests"
    monitor = yaml.safe_load((root / "monitoring" / "servicemonitor.yaml").read_text())
    service = yaml.safe_load((root / "service.yaml").read_text())
    spec = monitor["spec"]
    assert service["metadata"]["namespace"] in spec["namespaceSelector"]["matchNames"]
    labels = service["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items())
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in spec["endpoints"]} <= port_names
    assert labels[spec["jobLabel"]] == "egressgw"  # the job the alerts and dashboard query
