"""Steering: which pods of a worker node leave through the tunnel, to which gateway node, and
what a gateway node accepts from the tunnel."""

from __future__ import annotations

import ipaddress

from egressgw.policy.model import (
    EgressGateway,
    LabelSelector,
    Namespace,
    Node,
    Pod,
    Snapshot,
)
from egressgw.steering import AgentPlan, agent_plan, manifest_holders, tunnel_peers

IP = ipaddress.ip_address
GATEWAY_LABEL = {"egressgw.io/gateway": "true"}


def selector(**labels: str) -> LabelSelector:
    return LabelSelector(match_labels=tuple(sorted(labels.items())))


def gateway(
    name: str, project: str, *ips: str, nodes: LabelSelector | None = None
) -> EgressGateway:
    return EgressGateway(
        name=name,
        namespace_selector=selector(project=project),
        egress_ips=tuple(IP(i) for i in ips),
        node_selector=nodes,
    )


def node(name: str, *addresses: str, labels: dict[str, str] | None = None) -> Node:
    return Node(name, labels or {}, tuple(IP(a) for a in addresses))


def pod(ns: str, name: str, on: str, *ips: str, app: str = "api") -> Pod:
    return Pod(ns, name, {"app": app}, tuple(IP(i) for i in ips), on)


NODES = (
    node("gw-a", "192.0.2.1", "2001:db8::1", labels={**GATEWAY_LABEL, "zone": "a"}),
    node("gw-b", "192.0.2.2", "2001:db8::2", labels={**GATEWAY_LABEL, "zone": "b"}),
    node("worker-1", "192.0.2.11", "2001:db8::11"),
    node("worker-2", "192.0.2.12"),
)
PAYMENTS = gateway(
    "payments",
    "payments",
    "198.51.100.10",
    "2001:db8:100::10",
    nodes=selector(zone="a"),
)
ANALYTICS = gateway("analytics", "analytics", "198.51.100.20", nodes=selector(zone="b"))


def snapshot(
    *pods: Pod,
    gateways: tuple[EgressGateway, ...] = (PAYMENTS, ANALYTICS),
    nodes: tuple[Node, ...] = NODES,
) -> Snapshot:
    return Snapshot(
        namespaces={
            "payments": Namespace("payments", {"project": "payments"}),
            "analytics": Namespace("analytics", {"project": "analytics"}),
            "sandbox": Namespace("sandbox", {}),
        },
        pods=pods
        or (
            pod("payments", "api-0", "worker-1", "203.0.113.10", "2001:db8:1::10"),
            pod("payments", "api-1", "worker-2", "203.0.113.11"),
            pod("analytics", "etl-0", "worker-1", "203.0.113.20"),
            pod("sandbox", "shell-0", "worker-1", "203.0.113.30"),
        ),
        gateways=gateways,
        nodes=nodes,
    )


def test_each_egress_ip_is_held_by_the_first_node_by_name_its_selector_matches() -> None:
    snap = snapshot(
        gateways=(
            PAYMENTS,
            ANALYTICS,
            gateway("any", "payments", "198.51.100.30"),
            gateway("gateways", "payments", "198.51.100.40", nodes=selector(**GATEWAY_LABEL)),
            gateway("nowhere", "payments", "198.51.100.50", nodes=selector(zone="c")),
        ),
        nodes=tuple(reversed(NODES)),
    )
    assert manifest_holders(snap) == {
        IP("198.51.100.10"): "gw-a",
        IP("2001:db8:100::10"): "gw-a",
        IP("198.51.100.20"): "gw-b",
        IP("198.51.100.30"): "gw-a",  # no nodeSelector: any node
        IP("198.51.100.40"): "gw-a",
    }


def test_without_nodes_no_egress_ip_has_a_holder() -> None:
    assert manifest_holders(snapshot(nodes=())) == {}


def test_a_selected_pod_leaves_per_family_to_the_node_holding_its_gateways_ip() -> None:
    snap = snapshot()
    plan = agent_plan(snap, "worker-1", manifest_holders(snap))
    assert plan == AgentPlan(
        node="worker-1",
        local=IP("192.0.2.11"),
        steered={
            IP("203.0.113.10"): "payments",
            IP("2001:db8:1::10"): "payments",
            IP("203.0.113.20"): "analytics",
        },
        next_hops={
            ("payments", 4): IP("192.0.2.1"),
            ("payments", 6): IP("192.0.2.1"),
            ("analytics", 4): IP("192.0.2.2"),
        },
    )
    assert plan.peers == {IP("192.0.2.1"), IP("192.0.2.2")}


def test_unselected_pods_and_pods_of_other_nodes_are_not_steered() -> None:
    snap = snapshot()
    steered = agent_plan(snap, "worker-1", manifest_holders(snap)).steered
    assert IP("203.0.113.30") not in steered  # sandbox: no gateway selects it
    assert IP("203.0.113.11") not in steered  # payments, but on worker-2
    assert agent_plan(snap, "worker-2", manifest_holders(snap)).steered == {
        IP("203.0.113.11"): "payments"
    }


def test_the_family_of_a_gateway_without_a_reachable_holder_has_no_next_hop() -> None:
    snap = snapshot()
    holders = {IP("198.51.100.10"): "gw-a"}  # the IPv6 egress IP and analytics' are not held
    plan = agent_plan(snap, "worker-1", holders)
    assert plan.next_hops == {("payments", 4): IP("192.0.2.1")}
    assert plan.steered[IP("2001:db8:1::10")] == "payments"  # still steered: dropped, not leaked
    assert plan.notes == (
        "EgressGateway analytics: no node to send IPv4 traffic to (198.51.100.20 has no holder);"
        " the IPv4 traffic of its pods on worker-1 is dropped",
        "EgressGateway payments: no node to send IPv6 traffic to (2001:db8:100::10 has no"
        " holder); the IPv6 traffic of its pods on worker-1 is dropped",
    )


def test_a_holder_that_is_not_a_known_node_is_no_next_hop() -> None:
    snap = snapshot()
    plan = agent_plan(snap, "worker-1", {IP("198.51.100.10"): "gw-gone"})
    assert ("payments", 4) not in plan.next_hops
    assert (
        "EgressGateway payments: no node to send IPv4 traffic to (198.51.100.10 is held by Node"
        " gw-gone, which is not known); the IPv4 traffic of its pods on worker-1 is dropped"
    ) in plan.notes


def test_the_first_egress_ip_with_a_reachable_holder_decides_the_next_hop() -> None:
    two = gateway("payments", "payments", "198.51.100.10", "198.51.100.11")
    snap = snapshot(pod("payments", "api-0", "worker-1", "203.0.113.10"), gateways=(two,))
    both = {IP("198.51.100.10"): "gw-b", IP("198.51.100.11"): "gw-a"}
    assert agent_plan(snap, "worker-1", both).next_hops == {("payments", 4): IP("192.0.2.2")}
    second_only = {IP("198.51.100.10"): "gw-gone", IP("198.51.100.11"): "gw-a"}
    assert agent_plan(snap, "worker-1", second_only).next_hops == {("payments", 4): IP("192.0.2.1")}


def test_an_address_claimed_by_two_pods_is_steered_for_neither() -> None:
    snap = snapshot(
        pod("payments", "api-0", "worker-1", "203.0.113.10"),
        pod("payments", "api-1", "worker-2", "203.0.113.10", "203.0.113.11"),
    )
    holders = manifest_holders(snap)
    plan = agent_plan(snap, "worker-1", holders)
    assert plan.steered == {}
    assert plan.notes == (
        "address 203.0.113.10 is claimed by pods payments/api-0, payments/api-1; it belongs to"
        " none of them and is not steered",
    )
    assert agent_plan(snap, "worker-2", holders).steered == {IP("203.0.113.11"): "payments"}
    assert tunnel_peers(snap, "gw-a", holders).pods == {IP("203.0.113.11"): IP("192.0.2.12")}


def test_the_lowest_gateway_name_wins_as_in_the_gateway_plan() -> None:
    snap = snapshot(
        pod("payments", "api-0", "worker-1", "203.0.113.10"),
        gateways=(
            PAYMENTS,
            gateway("alpha", "payments", "198.51.100.30", nodes=selector(zone="b")),
        ),
    )
    plan = agent_plan(snap, "worker-1", manifest_holders(snap))
    assert plan.steered == {IP("203.0.113.10"): "alpha"}
    assert plan.next_hops == {("alpha", 4): IP("192.0.2.2")}


def test_an_unknown_node_has_no_local_address_and_says_so() -> None:
    snap = snapshot(pod("payments", "api-0", "worker-9", "203.0.113.10"))
    plan = agent_plan(snap, "worker-9", manifest_holders(snap))
    assert plan.local is None
    assert plan.steered == {IP("203.0.113.10"): "payments"}
    assert plan.notes == ("Node worker-9 is not known: the tunnel has no local address",)


def test_a_gateway_node_accepts_only_pods_whose_gateway_it_holds_from_their_nodes() -> None:
    snap = snapshot()
    holders = manifest_holders(snap)
    gw_a = tunnel_peers(snap, "gw-a", holders)
    assert gw_a.local == IP("192.0.2.1")
    assert gw_a.pods == {
        IP("203.0.113.10"): IP("192.0.2.11"),
        IP("2001:db8:1::10"): IP("192.0.2.11"),
        IP("203.0.113.11"): IP("192.0.2.12"),
    }
    assert gw_a.peers == {IP("192.0.2.11"), IP("192.0.2.12")}
    assert gw_a.notes == ()
    assert tunnel_peers(snap, "gw-b", holders).pods == {IP("203.0.113.20"): IP("192.0.2.11")}
    assert tunnel_peers(snap, "worker-1", holders).pods == {}


def test_the_gateway_node_and_the_agents_choose_the_same_node_per_family() -> None:
    snap = snapshot()
    holders = {IP("198.51.100.10"): "gw-b", IP("2001:db8:100::10"): "gw-a"}
    assert agent_plan(snap, "worker-1", holders).next_hops == {
        ("payments", 4): IP("192.0.2.2"),
        ("payments", 6): IP("192.0.2.1"),
    }
    assert tunnel_peers(snap, "gw-a", holders).pods == {IP("2001:db8:1::10"): IP("192.0.2.11")}
    assert tunnel_peers(snap, "gw-b", holders).pods == {
        IP("203.0.113.10"): IP("192.0.2.11"),
        IP("203.0.113.11"): IP("192.0.2.12"),
    }


def test_pods_whose_node_cannot_be_reached_are_left_out_with_a_note() -> None:
    snap = snapshot(
        pod("payments", "api-0", "worker-9", "203.0.113.10"),
        pod("payments", "api-1", "", "203.0.113.11"),
        pod("payments", "api-2", "worker-3", "203.0.113.12"),
        pod("payments", "api-3", "gw-a", "203.0.113.13"),
        pod("payments", "api-4", "worker-9", "203.0.113.14", "2001:db8:1::14"),
        nodes=(*NODES, node("worker-3")),
    )
    peers = tunnel_peers(snap, "gw-a", manifest_holders(snap))
    assert peers.pods == {}
    assert peers.notes == (
        "pod payments/api-1 has no node (spec.nodeName): not accepted from the tunnel",
        "pod payments/api-2 runs on Node worker-3, which has no InternalIP: not accepted from the"
        " tunnel",
        "pods payments/api-0, payments/api-4 run on Node worker-9, which is not known: not"
        " accepted from the tunnel",
    )
