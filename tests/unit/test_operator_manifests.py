"""The alerts' runbooks name what an operator will find in the cluster: the namespace the
gateways run in, the metrics Service and its port name, the Leases' names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"


def load(name: str) -> Any:
    return yaml.safe_load((MANIFESTS / name).read_text())


def runbooks() -> dict[str, str]:
    rules = load("monitoring/prometheusrule.yaml")
    return {
        rule["alert"]: " ".join(rule["annotations"]["runbook"].split())
        for group in rules["spec"]["groups"]
        for rule in group["rules"]
    }


def test_every_kubectl_in_a_runbook_names_the_gateways_namespace() -> None:
    namespace = load("namespace.yaml")["metadata"]["name"]
    assert namespace == load("daemonset.yaml")["metadata"]["namespace"] == "egressgw-system"
    found = 0
    for alert, runbook in runbooks().items():
        for command in re.findall(r"kubectl (?:-n \S+ )?\w+", runbook):
            if re.match(r"kubectl (get|logs|describe) (?!nodes)", command):
                assert command.startswith(f"kubectl -n {namespace} "), (alert, command)
        found += len(re.findall(rf"kubectl -n {re.escape(namespace)} ", runbook))
    assert found >= 5


def test_runbooks_name_the_metrics_services_port_and_name() -> None:
    service = load("service.yaml")
    ports = {port["name"] for port in service["spec"]["ports"]}
    for alert, runbook in runbooks().items():
        for named in re.findall(r'port named "([^"]+)"', runbook):
            assert named in ports, (alert, named)
    absent = runbooks()["EgressGatewayAbsent"]
    assert 'a port named "metrics"' in absent
    assert f"Service {service['metadata']['name']}" in absent
    port = service["spec"]["ports"][0]["port"]
    assert f":{port}/readyz" in runbooks()["EgressGatewayDown"]
