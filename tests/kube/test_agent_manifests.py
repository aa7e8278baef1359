"""The install manifests of the two programs, the gateway and the worker nodes' agent.

What a platform engineer would notice after ``kubectl apply -k manifests/``: the agent can only
read; it runs unprivileged on every node that is not a gateway node, and exactly one of the two
DaemonSets lands on any node; both update one node at a time; the gateway answers the DNS that
the agents steer to it; and one image runs both programs with the arguments the DaemonSets give
(parsed here by the real command-line parser). ``test_manifests`` validates every file against
the Kubernetes schemas.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from egressgw.cli import build_parser
from egressgw.policy.model import LabelSelector, SelectorOperator, SelectorRequirement

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
Obj = dict[str, Any]
READ_VERBS = {"get", "list", "watch"}
GATEWAY_LABEL = "egressgw.io/gateway"


def _docs() -> list[Obj]:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    return [
        doc
        for resource in kustomization["resources"]
        for doc in yaml.safe_load_all((MANIFESTS / resource).read_text())
        if doc is not None
    ]


def _one(kind: str, name: str) -> Obj:
    (found,) = [d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _container(daemonset: str) -> Obj:
    (container,) = _one("DaemonSet", daemonset)["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _expanded_args(container: Obj, node_name: str) -> list[str]:
    """The arguments as the kubelet passes them: ``$(VAR)`` replaced from the container's env."""
    values = {e["name"]: node_name for e in container.get("env", ()) if e["name"] == "NODE_NAME"}

    def expand(match: re.Match[str]) -> str:
        assert match.group(1) in values, f"$({match.group(1)}) is not in the container's env"
        return values[match.group(1)]

    return [re.sub(r"\$\((\w+)\)", expand, arg) for arg in container["args"]]


def test_the_agent_may_only_read_what_it_follows() -> None:
    agent = {"kind": "ServiceAccount", "name": "egressgw-agent", "namespace": "egressgw-system"}
    pod = _one("DaemonSet", "egressgw-agent")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == agent["name"]
    bound = [  # only to its own read-only roles, never to the gateway's status and Lease writes
        (doc["kind"], doc["roleRef"]["name"])
        for doc in _docs()
        if doc["kind"] in ("RoleBinding", "ClusterRoleBinding") and agent in doc["subjects"]
    ]
    assert sorted(bound) == [
        ("ClusterRoleBinding", "egressgw-agent"),
        ("RoleBinding", "egressgw-agent-leases"),
    ]
    cluster_rules = _one("ClusterRole", "egressgw-agent")["rules"]
    lease_role = _one("Role", "egressgw-agent-leases")
    assert lease_role["metadata"]["namespace"] == "egressgw-system"
    for rule in [*cluster_rules, *lease_role["rules"]]:
        assert set(rule["verbs"]) == READ_VERBS, rule
        assert "*" not in rule["resources"] and "*" not in rule["apiGroups"], rule
    readable = {r for rule in cluster_rules for r in rule["resources"]}
    assert readable == {"namespaces", "pods", "nodes", "egressgateways"}
    assert lease_role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "list", "watch"],
        }
    ]


def test_the_gateway_may_read_every_nodes_addresses() -> None:
    rules = _one("ClusterRole", "egressgw")["rules"]
    assert any({"list", "watch"} <= set(r["verbs"]) and "nodes" in r["resources"] for r in rules)


def test_the_agent_runs_unprivileged_with_its_nodes_name_and_host_network() -> None:
    pod = _one("DaemonSet", "egressgw-agent")["spec"]["template"]["spec"]
    container = _container("egressgw-agent")
    security = container["securityContext"]
    assert pod["hostNetwork"] is True
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    (node_name,) = [e for e in container["env"] if e["name"] == "NODE_NAME"]
    assert node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert container["args"][:3] == ["agent", "--kubernetes", "--node-name=$(NODE_NAME)"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def _agent_selector() -> LabelSelector:
    """The agent's required node affinity, as a label selector (one term: no OR)."""
    affinity = _one("DaemonSet", "egressgw-agent")["spec"]["template"]["spec"]["affinity"]
    (term,) = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert set(term) == {"matchExpressions"}
    return LabelSelector(
        match_expressions=tuple(
            SelectorRequirement(e["key"], SelectorOperator(e["operator"]), tuple(e["values"]))
            for e in term["matchExpressions"]
        )
    )


@pytest.mark.parametrize(
    "labels",
    [{}, {GATEWAY_LABEL: "true"}, {GATEWAY_LABEL: "false"}, {"zone": "a", GATEWAY_LABEL: "true"}],
)
def test_exactly_one_of_the_two_daemonsets_runs_on_any_node(labels: dict[str, str]) -> None:
    gateway_pod = _one("DaemonSet", "egressgw")["spec"]["template"]["spec"]
    gateway = LabelSelector(match_labels=tuple(gateway_pod["nodeSelector"].items()))
    agent = _agent_selector()
    assert [gateway.matches(labels), agent.matches(labels)].count(True) == 1
    assert agent.matches(labels) == (labels.get(GATEWAY_LABEL) != "true")


@pytest.mark.parametrize("name", ["egressgw", "egressgw-agent"])
def test_each_daemonset_updates_one_node_at_a_time(name: str) -> None:
    strategy = _one("DaemonSet", name)["spec"]["updateStrategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}


def test_the_gateway_answers_the_dns_the_agents_steer_to_it() -> None:
    gateway = build_parser().parse_args(_expanded_args(_container("egressgw"), "gw-a"))
    agent = build_parser().parse_args(_expanded_args(_container("egressgw-agent"), "worker-a"))
    assert (gateway.command, gateway.kubernetes, gateway.node_name) == ("run", True, "gw-a")
    assert (agent.command, agent.kubernetes, agent.node_name) == ("agent", True, "worker-a")
    assert gateway.dns_listen, "the DNS interceptor is off"
    assert gateway.passthrough_domain == ["cluster.local"]
    (upstream,) = gateway.upstream
    assert [str(a) for a in agent.dns_address] == [upstream[0]] and upstream[1] == 53
    assert agent.lease_namespace == gateway.lease_namespace
    networks = [ipaddress.ip_network(n) for n in agent.cluster_cidr]
    assert len(networks) >= 3, "the pod, Service and node networks stay inside the cluster"


def test_one_image_runs_both_programs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["egressgw"\]$', dockerfile, re.M)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["egressgw"] == "egressgw.cli:entry"
    images = {_container(name)["image"] for name in ("egressgw", "egressgw-agent")}
    assert len(images) == 1
    commands = {_container(name)["args"][0] for name in ("egressgw", "egressgw-agent")}
    assert commands == {"run", "agent"}
