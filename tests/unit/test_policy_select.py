"""Which gateway and which policies select a pod; conflicts; the address index at scale."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

import pytest

from egressgw.policy.model import (
    EgressGateway,
    EgressPolicy,
    LabelSelector,
    Mode,
    Namespace,
    Pod,
    SelectorOperator,
    SelectorRequirement,
    Snapshot,
)
from egressgw.policy.select import (
    AddressConflict,
    index_workloads,
    select_gateway,
    select_policies,
    select_workload,
)

ip = ipaddress.ip_address


def labels(**items: str) -> LabelSelector:
    return LabelSelector(tuple(sorted(items.items())))


def gw(name: str, namespaces: LabelSelector, pods: LabelSelector | None = None) -> EgressGateway:
    return EgressGateway(name, namespaces, pods or LabelSelector())


def pol(namespace: str, name: str, pods: LabelSelector, mode: Mode = Mode.ENFORCE) -> EgressPolicy:
    return EgressPolicy(namespace, name, pods, mode)


NAMESPACES = {
    "payments": Namespace("payments", {"project": "payments"}),
    "analytics": Namespace("analytics", {"project": "analytics", "tier": "batch"}),
    "sandbox": Namespace("sandbox", {}),
}
GATEWAYS = (
    gw("payments", labels(project="payments")),
    gw("analytics", labels(project="analytics")),
    gw(
        "batch-gpu",
        LabelSelector(match_expressions=(SelectorRequirement("tier", SelectorOperator.EXISTS),)),
        labels(gpu="yes"),
    ),
    gw("sandbox-by-name", labels(**{"kubernetes.io/metadata.name": "sandbox"})),
)
POLICIES = (
    pol("payments", "web", labels(app="api")),
    pol("payments", "database", labels(app="api")),
    pol("payments", "everyone", LabelSelector()),
    pol("analytics", "database", labels(app="etl")),
    pol("payments", "workers", labels(app="worker")),
)
PODS = (
    Pod("payments", "api-0", {"app": "api"}, (ip("192.0.2.10"), ip("2001:db8:1::10"))),
    Pod("payments", "worker-0", {"app": "worker"}, (ip("192.0.2.11"),)),
    Pod("analytics", "etl-0", {"app": "etl"}, (ip("192.0.2.20"),)),
    Pod("analytics", "etl-gpu", {"app": "etl", "gpu": "yes"}, (ip("192.0.2.21"),)),
    Pod("sandbox", "shell-0", {"app": "shell"}, (ip("192.0.2.30"),)),
    Pod("orphan", "lost", {}, (ip("192.0.2.40"),)),
)
SNAPSHOT = Snapshot(NAMESPACES, PODS, GATEWAYS, POLICIES)


def summary(pod: Pod) -> tuple[str | None, list[str], tuple[str, ...]]:
    selection = select_workload(SNAPSHOT, pod)
    gateway = selection.gateway.name if selection.gateway else None
    return gateway, [p.name for p in selection.policies], selection.conflicts


def test_selection_per_pod() -> None:
    assert [summary(pod) for pod in PODS] == [
        ("payments", ["database", "everyone", "web"], ()),
        ("payments", ["everyone", "workers"], ()),
        ("analytics", ["database"], ()),
        # two gateways select etl-gpu: the lowest name wins, the other is reported
        ("analytics", ["database"], ("batch-gpu",)),
        # the namespace name label is implicit, as the API server sets it
        ("sandbox-by-name", [], ()),
        # a pod whose Namespace is unknown matches no label-based namespaceSelector
        (None, [], ()),
    ]


def test_select_gateway_directly() -> None:
    choice = select_gateway(GATEWAYS, {"project": "payments"}, {"app": "x"})
    assert choice.gateway is not None and choice.gateway.name == "payments"
    assert choice.conflicts == ()
    assert select_gateway(GATEWAYS, {}, {}).gateway is None


def test_policies_of_other_namespaces_never_select() -> None:
    assert select_policies(POLICIES, "analytics", {"app": "api"}) == ()
    assert [p.name for p in select_policies(POLICIES, "payments", {"app": "other"})] == ["everyone"]


def test_index_agrees_with_per_pod_selection() -> None:
    index = index_workloads(SNAPSHOT)
    assert len(index.selections) == len(PODS)
    for pod in PODS:
        for address in pod.ips:
            assert index.lookup(address) == select_workload(SNAPSHOT, pod)
    assert [s.pod.name for s in index.gateway_conflicts] == ["etl-gpu"]
    assert index.address_conflicts == ()


def test_an_address_claimed_by_two_pods_belongs_to_neither() -> None:
    pods = (
        Pod("payments", "old", {"app": "api"}, (ip("192.0.2.50"), ip("2001:db8:1::50"))),
        Pod("analytics", "new", {"app": "etl"}, (ip("192.0.2.50"),)),
    )
    index = index_workloads(Snapshot(NAMESPACES, pods, GATEWAYS, POLICIES))
    assert index.lookup(ip("192.0.2.50")) is None
    found = index.lookup(ip("2001:db8:1::50"))
    assert found is not None and found.pod.name == "old"
    assert index.address_conflicts == (
        AddressConflict(ip("192.0.2.50"), ("analytics/new", "payments/old")),
    )


def many_pods(count: int) -> tuple[Pod, ...]:
    """``count`` pods over 30 distinct (namespace, labels) sets."""
    hosts = ipaddress.IPv4Network("10.0.0.0/16").hosts()
    return tuple(
        Pod(
            "payments" if i % 2 else "analytics",
            f"pod-{i}",
            {"app": "api" if i % 3 else "etl", "shard": str(i % 5)},
            (next(hosts),),
        )
        for i in range(count)
    )


def test_selectors_are_evaluated_per_label_set_not_per_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    original = LabelSelector.matches

    def counting(self: LabelSelector, labels: Mapping[str, str]) -> bool:
        nonlocal calls
        calls += 1
        return original(self, labels)

    monkeypatch.setattr(LabelSelector, "matches", counting)
    policies = POLICIES + tuple(
        pol("payments", f"extra-{i}", labels(app="api", shard=str(i % 5))) for i in range(200)
    )
    evaluations = []
    for count in (1_000, 10_000):
        calls = 0
        index = index_workloads(Snapshot(NAMESPACES, many_pods(count), GATEWAYS, policies))
        assert len(index.by_address) == count
        evaluations.append(calls)
    assert evaluations[0] == evaluations[1]
    # at most every gateway per namespace, then every gateway and policy per label set
    assert evaluations[1] <= 2 * len(GATEWAYS) + 30 * (len(GATEWAYS) + len(policies))


def test_index_of_ten_thousand_pods_matches_per_pod_selection() -> None:
    pods = many_pods(10_000)
    snapshot = Snapshot(NAMESPACES, pods, GATEWAYS, POLICIES)
    index = index_workloads(snapshot)
    for pod in pods[:100]:
        assert index.lookup(pod.ips[0]) == select_workload(snapshot, pod)
