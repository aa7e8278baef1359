"""From objects to datapath state: selection, conflicts, audit, SNAT and fail-closed rules."""

from __future__ import annotations

import ipaddress

from egressgw.datapath.state import Box
from egressgw.identity import IdentityRegistry
from egressgw.plan import build
from egressgw.policy.model import (
    Action,
    EgressGateway,
    EgressPolicy,
    EgressRule,
    LabelSelector,
    Mode,
    Namespace,
    Peer,
    Pod,
    PortSpec,
    Protocol,
    Snapshot,
)

IP = ipaddress.ip_address
NET = ipaddress.ip_network


def selector(**labels: str) -> LabelSelector:
    return LabelSelector(match_labels=tuple(sorted(labels.items())))


def gateway(name: str, project: str, *ips: str, default: Action = Action.DENY) -> EgressGateway:
    return EgressGateway(
        name=name,
        namespace_selector=selector(project=project),
        egress_ips=tuple(IP(i) for i in ips),
        default_action=default,
    )


def db_policy(
    namespace: str, mode: Mode = Mode.ENFORCE, action: Action = Action.ALLOW
) -> EgressPolicy:
    rule = EgressRule(
        action=action,
        to=(Peer(cidr=NET("203.0.113.10/32")), Peer(fqdn="db.lab.example")),
        ports=(PortSpec(Protocol.TCP, 5432),),
    )
    return EgressPolicy(namespace, "database", selector(app="api"), mode, (rule,))


def snapshot(
    *policies: EgressPolicy, gateways: tuple[EgressGateway, ...] | None = None
) -> Snapshot:
    return Snapshot(
        namespaces={
            "payments": Namespace("payments", {"project": "payments"}),
            "sandbox": Namespace("sandbox", {}),
        },
        pods=(
            Pod("payments", "api-0", {"app": "api"}, (IP("192.0.2.10"), IP("2001:db8:1::10"))),
            Pod("payments", "api-1", {"app": "api"}, (IP("192.0.2.11"),)),
            Pod("payments", "batch-0", {"app": "batch"}, (IP("192.0.2.12"),)),
            Pod("sandbox", "shell-0", {"app": "shell"}, (IP("192.0.2.30"),)),
        ),
        gateways=gateways
        if gateways is not None
        else (gateway("payments", "payments", "198.51.100.10", "2001:db8:100::10"),),
        policies=policies,
    )


def test_pods_with_the_same_labels_share_one_identity_and_unselected_pods_are_not_workloads() -> (
    None
):
    plan = build(snapshot(db_policy("payments")), IdentityRegistry())
    w = plan.desired.workloads
    assert w[IP("192.0.2.10")] == w[IP("192.0.2.11")] == w[IP("2001:db8:1::10")]
    assert w[IP("192.0.2.12")] != w[IP("192.0.2.10")]
    assert IP("192.0.2.30") not in w
    assert plan.workloads.lookup(IP("192.0.2.11")).pod == "api-1"  # type: ignore[union-attr]


def test_cidr_rules_become_boxes_and_names_do_not() -> None:
    plan = build(snapshot(db_policy("payments")), IdentityRegistry())
    api = plan.desired.workloads[IP("192.0.2.10")]
    assert plan.desired.allow_net == {Box.of(api, NET("203.0.113.10/32"), (6, 6), (5432, 5432))}
    assert plan.desired.deny_net == set()


def test_each_family_snats_to_the_gateways_address_of_that_family() -> None:
    plan = build(snapshot(), IdentityRegistry())
    api = plan.desired.workloads[IP("192.0.2.10")]
    assert plan.desired.snat[4][api] == IP("198.51.100.10")
    assert plan.desired.snat[6][api] == IP("2001:db8:100::10")
    assert plan.desired.egress_ips == {IP("198.51.100.10"), IP("2001:db8:100::10")}


def test_egress_ip_not_held_here_leaves_no_snat_so_traffic_is_dropped() -> None:
    plan = build(snapshot(), IdentityRegistry(), held=lambda _gw, addr: addr.version == 6)
    api = plan.desired.workloads[IP("192.0.2.10")]
    assert api not in plan.desired.snat[4] and api in plan.desired.snat[6]
    assert plan.desired.egress_ips == {IP("2001:db8:100::10")}


def test_two_gateways_selecting_a_pod_pick_the_lowest_name_and_say_so() -> None:
    both = (
        gateway("zeta", "payments", "198.51.100.30"),
        gateway("alpha", "payments", "198.51.100.20"),
    )
    plan = build(snapshot(gateways=both), IdentityRegistry())
    api = plan.desired.workloads[IP("192.0.2.10")]
    assert plan.desired.snat[4][api] == IP("198.51.100.20")
    assert any("selected by EgressGateways alpha, zeta; using alpha" in n for n in plan.notes)
    assert set(plan.conflicts) == {"alpha", "zeta"}


def test_one_egress_ip_claimed_by_two_gateways_goes_to_the_first() -> None:
    gws = (gateway("a", "payments", "198.51.100.10"), gateway("b", "other", "198.51.100.10"))
    plan = build(snapshot(gateways=gws), IdentityRegistry())
    assert any("198.51.100.10 is already used by EgressGateway a" in n for n in plan.notes)


def test_audit_only_identity_is_marked_and_enforce_policies_win() -> None:
    plan = build(snapshot(db_policy("payments", Mode.AUDIT)), IdentityRegistry())
    api = plan.desired.workloads[IP("192.0.2.10")]
    assert plan.desired.audit == {api}
    enforce = EgressPolicy("payments", "web", selector(app="api"), Mode.ENFORCE, ())
    plan = build(snapshot(db_policy("payments", Mode.AUDIT), enforce), IdentityRegistry())
    assert plan.desired.audit == set()
    assert plan.desired.allow_net == set()  # the Audit policy's rules are not programmed


def test_deny_rules_and_default_allow() -> None:
    gws = (gateway("payments", "payments", "198.51.100.10", default=Action.ALLOW),)
    plan = build(
        snapshot(db_policy("payments", action=Action.DENY), gateways=gws), IdentityRegistry()
    )
    api = plan.desired.workloads[IP("192.0.2.10")]
    assert plan.desired.deny_net and plan.desired.allow_net == set()
    assert api in plan.desired.default_allow


def test_identities_of_vanished_pods_are_released() -> None:
    registry = IdentityRegistry()
    first = build(snapshot(), registry)
    assert len(first.desired.identities) == 2
    gone = Snapshot(namespaces=snapshot().namespaces, gateways=snapshot().gateways)
    assert build(gone, registry).desired.identities == {}


def test_an_address_claimed_by_two_pods_belongs_to_neither() -> None:
    base = snapshot()
    twin = Pod("payments", "api-9", {"app": "api"}, (IP("192.0.2.10"),))
    clash = Snapshot(base.namespaces, (*base.pods, twin), base.gateways, base.policies)
    plan = build(clash, IdentityRegistry())
    assert IP("192.0.2.10") not in plan.desired.workloads
    assert IP("192.0.2.11") in plan.desired.workloads
    assert any(
        "192.0.2.10 is claimed by pods payments/api-0, payments/api-9" in n for n in plan.notes
    )
