"""From the objects to the datapath: which workloads leave through which gateway, allowed where.

In: a Snapshot, the identity registry, and which egress IPs this node holds. Out: the datapath's
DesiredState, the address -> Workload table the DNS interceptor uses, and notes (conflicts) for
the log and status. Pure: no I/O, no clock.

Rules of the plan (selection itself is ``policy.select``'s):
- a pod leaves through the gateway that selects it; when several do, the one with the lowest
  name wins and the conflict is noted; an address claimed by two pods belongs to neither;
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from egressgw.datapath.state import ANY_PORT, ANY_PROTO, Box, DesiredState
from egressgw.identity import IdentityKey, IdentityRegistry, Workload, WorkloadTable
from egressgw.policy.decide import deciding_policies
from egressgw.policy.model import Action, EgressGateway, PortSpec, Snapshot
from egressgw.policy.select import WorkloadSelection, index_workloads

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
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
    selections: dict[int, WorkloadSelection] = field(default_factory=dict)  # per identity


def port_boxes(ports: Iterable[PortSpec]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(protocol range, port range) pairs of a rule's ports; no ports: everything."""
    specs = list(ports)
    if not specs:
        return [(ANY_PROTO, ANY_PORT)]
    return [((p.protocol.number, p.protocol.number), p.port_range) for p in specs]


def build(snapshot: Snapshot, registry: IdentityRegistry, held: HeldBy = hold_everything) -> Plan:
    desired = DesiredState()
    plan = Plan(desired=desired, workloads=WorkloadTable())
    snat_of = _egress_ips(snapshot, held, desired, plan.notes)
    index = index_workloads(snapshot)
    for conflict in index.address_conflicts:
        plan.notes.append(
            f"address {conflict.address} is claimed by pods {', '.join(conflict.pods)}; "
            "it belongs to none of them"
        )

    identities: dict[IdentityKey, int] = {}
    workloads: dict[IPAddress, Workload] = {}
    for address, selection in index.by_address.items():
        pod, gateway = selection.pod, selection.gateway
        if gateway is None:
            continue  # not a workload: the datapath rejects its traffic
        key = IdentityKey.of(pod.namespace, pod.labels)
        identity = identities.get(key)
        if identity is None:
            identity = identities[key] = registry.number(key)
            _program_identity(desired, identity, selection, snat_of[gateway.name])
            plan.selections[identity] = selection
            if selection.conflicts:
                note = (
                    f"pods of namespace {pod.namespace} with labels {dict(pod.labels)} are "
                    f"selected by EgressGateways {gateway.name}, {', '.join(selection.conflicts)}; "
                    f"using {gateway.name}"
                )
                plan.notes.append(note)
                for name in (gateway.name, *selection.conflicts):
                    plan.conflicts.setdefault(name, []).append(note)
        workloads[address] = Workload(pod.namespace, pod.name, pod.labels, identity, gateway.name)
        desired.workloads[address] = identity

    desired.identities = registry.retain(identities)
    plan.workloads = WorkloadTable(workloads)
    return plan


def owned_egress_ips(
    gateways: Iterable[EgressGateway], notes: list[str]
) -> list[tuple[EgressGateway, tuple[IPAddress, ...]]]:
    """Each gateway, sorted by name, with its egress IPs in order, less those that a gateway
    whose name sorts first already lists (a note for each of those)."""
    owned: list[tuple[EgressGateway, tuple[IPAddress, ...]]] = []
    owner_of_ip: dict[IPAddress, str] = {}
    for gateway in sorted(gateways, key=lambda g: g.name):
        kept: list[IPAddress] = []
        for address in gateway.egress_ips:
            owner = owner_of_ip.setdefault(address, gateway.name)
            if owner != gateway.name:
                notes.append(
                    f"EgressGateway {gateway.name}: egress IP {address} is already used by "
                    f"EgressGateway {owner}; ignored"
                )
                continue
            kept.append(address)
        owned.append((gateway, tuple(kept)))
    return owned


def _egress_ips(
    snapshot: Snapshot, held: HeldBy, desired: DesiredState, notes: list[str]
) -> dict[str, dict[int, IPAddress]]:
    """Per gateway, the egress IP of each family its traffic is SNATed to on this node."""
    snat_of: dict[str, dict[int, IPAddress]] = {}
    for gateway, egress_ips in owned_egress_ips(snapshot.gateways, notes):
        chosen: dict[int, IPAddress] = {}
        for address in egress_ips:
            if held(gateway, address):
                desired.egress_ips.add(address)
                chosen.setdefault(address.version, address)
        snat_of[gateway.name] = chosen
    return snat_of


def _program_identity(
    desired: DesiredState,
    identity: int,
    selection: WorkloadSelection,
    snat: dict[int, IPAddress],
) -> None:
    assert selection.gateway is not None
    programmed, audit = deciding_policies(selection.policies)
    if audit:
        desired.audit.add(identity)
    if selection.gateway.default_action is Action.ALLOW:
        desired.default_allow.add(identity)
    for family, address in snat.items():
        desired.snat[family][identity] = address
    for policy in programmed:
        for rule in policy.egress:
            target = desired.deny_net if rule.action is Action.DENY else desired.allow_net
            for peer in rule.to:
                if peer.cidr is not None:
                    for proto, ports in port_boxes(rule.ports):
                        target.add(Box.of(identity, peer.cidr, proto, ports))
