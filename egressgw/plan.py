"""From the objects to the datapath: which workloads leave through which gateway, allowed where.

In: a Snapshot, the identity registry, and which egress IPs this node holds. Out: the datapath's
DesiredState, the address -> Workload table the DNS interceptor uses, and notes (conflicts) for
the log and status. Pure: no I/O, no clock.

Rules of the plan:
- a pod leaves through the gateway whose namespaceSelector and podSelector select it; when several
  do, the one with the lowest name wins and the conflict is noted;
- pods that no gateway selects are not workloads: the datapath rejects their traffic;
- an identity is (namespace, pod labels); its CIDR rules become Allow/Deny boxes. When any
  Enforce policy selects the identity, only Enforce policies' rules are programmed; when only
  Audit policies select it, their rules are programmed and would-deny traffic is logged and
  accepted instead of rejected;
- a gateway's traffic is SNATed to its first held egress IP of each family; a family with no held
  egress IP is dropped, never masqueraded.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from egressgw.datapath.state import ANY_PORT, ANY_PROTO, Box, DesiredState
from egressgw.identity import IdentityKey, IdentityRegistry, Workload, WorkloadTable
from egressgw.policy.model import (
    Action,
    EgressGateway,
    EgressPolicy,
    Mode,
    PortSpec,
    Snapshot,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
HeldBy = Callable[[EgressGateway, IPAddress], bool]


def hold_everything(_gateway: EgressGateway, _address: IPAddress) -> bool:
    """Manifests mode: this node holds every egress IP of every gateway."""
    return True


@dataclass
class Plan:
    desired: DesiredState
    workloads: WorkloadTable
    notes: list[str] = field(default_factory=list)
    conflicts: dict[str, list[str]] = field(default_factory=dict)  # gateway -> notes
    identity_policies: dict[int, tuple[EgressPolicy, ...]] = field(default_factory=dict)


def port_boxes(ports: Iterable[PortSpec]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(protocol range, port range) pairs of a rule's ports; no ports: everything."""
    specs = list(ports)
    if not specs:
        return [(ANY_PROTO, ANY_PORT)]
    return [((p.protocol.number, p.protocol.number), p.port_range) for p in specs]


def namespace_labels(snapshot: Snapshot, namespace: str) -> dict[str, str]:
    ns = snapshot.namespaces.get(namespace)
    labels = dict(ns.labels) if ns else {}
    labels.setdefault(NAMESPACE_NAME_LABEL, namespace)  # as the API server sets it
    return labels


def effective_policies(policies: Iterable[EgressPolicy]) -> tuple[tuple[EgressPolicy, ...], bool]:
    """The policies whose rules are programmed, and whether the identity is in Audit mode."""
    selected = tuple(policies)
    enforcing = tuple(p for p in selected if p.mode is Mode.ENFORCE)
    if enforcing:
        return enforcing, False
    return selected, bool(selected)


def build(snapshot: Snapshot, registry: IdentityRegistry, held: HeldBy = hold_everything) -> Plan:
    desired = DesiredState()
    plan = Plan(desired=desired, workloads=WorkloadTable())
    gateways = sorted(snapshot.gateways, key=lambda g: g.name)
    by_namespace: dict[str, list[EgressPolicy]] = {}
    for policy in sorted(snapshot.policies, key=lambda p: (p.namespace, p.name)):
        by_namespace.setdefault(policy.namespace, []).append(policy)

    snat_of: dict[str, dict[int, IPAddress]] = {}
    owner_of_ip: dict[IPAddress, str] = {}
    for gateway in gateways:
        chosen: dict[int, IPAddress] = {}
        for address in gateway.egress_ips:
            owner = owner_of_ip.setdefault(address, gateway.name)
            if owner != gateway.name:
                plan.notes.append(
                    f"EgressGateway {gateway.name}: egress IP {address} is already used by "
                    f"EgressGateway {owner}; ignored"
                )
                continue
            if held(gateway, address):
                desired.egress_ips.add(address)
                chosen.setdefault(address.version, address)
        snat_of[gateway.name] = chosen

    groups: dict[IdentityKey, list[tuple[str, Mapping[str, str], tuple[IPAddress, ...]]]] = {}
    for pod in sorted(snapshot.pods, key=lambda p: (p.namespace, p.name)):
        if pod.ips:
            key = IdentityKey.of(pod.namespace, pod.labels)
            groups.setdefault(key, []).append((pod.name, pod.labels, pod.ips))

    workloads: dict[IPAddress, Workload] = {}
    live_keys: list[IdentityKey] = []
    for key, pods in groups.items():
        pod_labels = dict(key.labels)
        ns_labels = namespace_labels(snapshot, key.namespace)
        matching = [
            g
            for g in gateways
            if g.namespace_selector.matches(ns_labels) and g.pod_selector.matches(pod_labels)
        ]
        if not matching:
            continue
        gateway = matching[0]
        if len(matching) > 1:
            others = ", ".join(g.name for g in matching[1:])
            note = (
                f"pods of namespace {key.namespace} with labels {pod_labels} are selected by "
                f"EgressGateways {gateway.name}, {others}; using {gateway.name}"
            )
            plan.notes.append(note)
            for g in matching:
                plan.conflicts.setdefault(g.name, []).append(note)
        identity = registry.number(key)
        live_keys.append(key)
        selected = [
            p for p in by_namespace.get(key.namespace, []) if p.pod_selector.matches(pod_labels)
        ]
        programmed, audit = effective_policies(selected)
        plan.identity_policies[identity] = tuple(selected)
        if audit:
            desired.audit.add(identity)
        if gateway.default_action is Action.ALLOW:
            desired.default_allow.add(identity)
        for family, address in snat_of[gateway.name].items():
            desired.snat[family][identity] = address
        for policy in programmed:
            for rule in policy.egress:
                target = desired.deny_net if rule.action is Action.DENY else desired.allow_net
                for peer in rule.to:
                    if peer.cidr is None:
                        continue
                    for proto, ports in port_boxes(rule.ports):
                        target.add(Box.of(identity, peer.cidr, proto, ports))
        for pod_name, labels, ips in pods:
            for address in ips:
                if address in workloads:
                    other = workloads[address]
                    plan.notes.append(
                        f"pod {key.namespace}/{pod_name} has address {address} already used by "
                        f"pod {other.namespace}/{other.pod}; ignored"
                    )
                    continue
                workloads[address] = Workload(
                    key.namespace, pod_name, labels, identity, gateway.name
                )
                desired.workloads[address] = identity

    desired.identities = registry.retain(live_keys)
    plan.workloads = WorkloadTable(workloads)
    return plan
