"""The worker agent and a gateway node's end of the tunnel, with fake datapaths: what an operator
of a cluster would see. Time is the fake's; nothing here sleeps."""

from __future__ import annotations

import asyncio
import csv
import io
import ipaddress
import logging
import socket
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY, generate_latest

from egressgw import app, metrics
from egressgw.agent import Agent, AgentSettings, Backoff
from egressgw.identity import IdentityRegistry
from egressgw.plan import build
from egressgw.policy.load import build_snapshot, parse_manifest
from egressgw.policy.model import IPAddress, Snapshot
from egressgw.report import format_rows, from_json
from egressgw.runtime import Daemon, GatewayNode, Settings
from egressgw.steering import manifest_holders
from egressgw.testing.agent import (
    FakeAgentDatapath,
    FakeGatewayTunnel,
    FakeHolders,
    SnapshotFeed,
)

IP = ipaddress.ip_address
NODES = """\
apiVersion: v1
kind: Node
metadata: {name: w1}
status: {addresses: [{type: InternalIP, address: 203.0.113.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: w2}
status: {addresses: [{type: InternalIP, address: 203.0.113.2}]}
---
apiVersion: v1
kind: Node
metadata: {name: gw-a, labels: {egressgw.io/gateway: a}}
status: {addresses: [{type: InternalIP, address: 203.0.113.11}]}
---
apiVersion: v1
kind: Node
metadata: {name: gw-b, labels: {egressgw.io/gateway: b}}
status: {addresses: [{type: InternalIP, address: 203.0.113.12}]}
"""
CLUSTER = """\
apiVersion: v1
kind: Namespace
metadata: {name: payments, labels: {project: payments}}
---
apiVersion: v1
kind: Namespace
metadata: {name: analytics, labels: {project: analytics}}
---
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Pod
metadata: {name: api-0, namespace: payments, labels: {app: api}}
spec: {nodeName: w1}
status: {podIPs: [{ip: 192.0.2.10}, {ip: "2001:db8:1::10"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: payments, labels: {app: api}}
spec: {nodeName: w2}
status: {podIPs: [{ip: 192.0.2.11}]}
---
apiVersion: v1
kind: Pod
metadata: {name: etl-0, namespace: analytics, labels: {app: etl}}
spec: {nodeName: w1}
status: {podIPs: [{ip: 192.0.2.20}, {ip: "2001:db8:1::20"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: plain-0, namespace: default}
spec: {nodeName: w1}
status: {podIPs: [{ip: 192.0.2.30}]}
---
apiVersion: egressgw.io/v1alpha1
kind: EgressGateway
metadata: {name: payments}
spec:
  namespaceSelector: {matchLabels: {project: payments}}
  egressIPs: ["198.51.100.10", "2001:db8:100::10"]
  nodeSelector: {matchLabels: {egressgw.io/gateway: a}}
---
apiVersion: egressgw.io/v1alpha1
kind: EgressGateway
metadata: {name: analytics}
spec:
  namespaceSelector: {matchLabels: {project: analytics}}
  egressIPs: ["198.51.100.20"]
  nodeSelector: {matchLabels: {egressgw.io/gateway: b}}
"""
API_2 = """\
---
apiVersion: v1
kind: Pod
metadata: {name: api-2, namespace: payments, labels: {app: api}}
spec: {nodeName: w1}
status: {podIPs: [{ip: 192.0.2.12}]}
"""
W1, GW_A, GW_B = IP("203.0.113.1"), IP("203.0.113.11"), IP("203.0.113.12")
PAYMENTS4, PAYMENTS6, ANALYTICS4 = IP("198.51.100.10"), IP("2001:db8:100::10"), IP("198.51.100.20")
LEASES: dict[IPAddress, str] = {PAYMENTS4: "gw-a", PAYMENTS6: "gw-a", ANALYTICS4: "gw-b"}


def snapshot_of(text: str) -> Snapshot:
    objects, problems = parse_manifest("test.yaml", text.encode())
    assert problems == []
    snapshot, cross = build_snapshot(objects)
    assert cross == []
    return snapshot


FULL = snapshot_of(NODES + "---\n" + CLUSTER)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings(node: str = "w1") -> AgentSettings:
    return AgentSettings(
        node_name=node,
        cluster_cidrs=(ipaddress.ip_network("192.0.2.0/24"),),
        dns_addresses=(IP("192.0.2.53"),),
    )


def agent(
    holders: FakeHolders | None = None, node: str = "w1"
) -> tuple[Agent, FakeAgentDatapath, SnapshotFeed]:
    datapath, feed = FakeAgentDatapath(), SnapshotFeed()
    return Agent(settings(node), datapath, feed, holders, Clock()), datapath, feed


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- what is steered, to where --------------------------------------------------------------


def test_the_selected_pods_of_this_node_are_steered_to_the_node_holding_their_egress_ip(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker, datapath, _ = agent()
    worker.snapshot = FULL
    with caplog.at_level(logging.INFO, logger="egressgw.agent"):
        assert worker.reconcile()
    assert datapath.calls == ["setup", "apply"] and datapath.local == W1
    plan = datapath.in_force
    assert plan is not None
    # api-1 runs on w2 and plain-0 is selected by no gateway: neither is steered from w1
    assert plan.steered == {
        IP("192.0.2.10"): "payments",
        IP("2001:db8:1::10"): "payments",
        IP("192.0.2.20"): "analytics",
        IP("2001:db8:1::20"): "analytics",
    }
    assert plan.next_hops == {("payments", 4): GW_A, ("payments", 6): GW_A, ("analytics", 4): GW_B}
    applied = [r.getMessage() for r in caplog.records if r.getMessage().startswith("applied:")]
    assert applied == [
        "applied: 4 pod addresses steered (analytics 2, payments 2; +4 -0); next hops: "
        "analytics/IPv4 gw-b 203.0.113.12, payments/IPv4 gw-a 203.0.113.11, "
        "payments/IPv6 gw-a 203.0.113.11; dropped, no gateway node to send to: analytics/IPv6; "
        "local 203.0.113.1 (0.0 ms)"
    ]
    # the reason analytics' IPv6 traffic is dropped is said once, as a warning
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("analytics" in w and "no IPv6 egress IP" in w for w in warnings), warnings


def test_an_unchanged_desired_state_applies_nothing_and_a_new_pod_applies_once() -> None:
    worker, datapath, _ = agent()
    worker.snapshot = FULL
    assert worker.reconcile()
    worker.snapshot = snapshot_of(NODES + "---\n" + CLUSTER)  # equal, another object
    assert not worker.reconcile()
    worker.snapshot = snapshot_of(NODES + "---\n" + CLUSTER + API_2)
    assert worker.reconcile()
    assert datapath.calls == ["setup", "apply", "apply"]  # set up once: the address is the same
    assert datapath.in_force is not None and IP("192.0.2.12") in datapath.in_force.steered


def test_a_holder_change_reapplies_and_no_holder_fails_closed() -> None:
    holders = FakeHolders(LEASES)
    worker, datapath, _ = agent(holders)
    worker.snapshot = FULL
    worker.holders_known = True
    assert worker.reconcile()
    holders.set({**LEASES, PAYMENTS4: "gw-b"})
    assert worker.reconcile()
    assert datapath.in_force is not None
    assert datapath.in_force.next_hops[("payments", 4)] == GW_B
    assert datapath.in_force.next_hops[("payments", 6)] == GW_A
    holders.set({PAYMENTS4: "gw-b", PAYMENTS6: "gw-a"})  # analytics' Lease is gone
    assert worker.reconcile()
    assert ("analytics", 4) not in datapath.in_force.next_hops
    report = worker.report()
    assert report.fail_closed[("analytics", 4)] is True
    assert report.fail_closed[("payments", 4)] is False


def test_an_unknown_node_is_waited_for_and_nothing_is_applied(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker, datapath, _ = agent(node="w9")
    worker.snapshot = FULL
    with caplog.at_level(logging.INFO, logger="egressgw.agent"):
        assert not worker.reconcile()
        assert not worker.reconcile()
    assert datapath.calls == []  # what a previous run left stays in force
    said = [r.getMessage() for r in caplog.records if "Node w9" in r.getMessage()]
    assert len(said) == 1 and "waiting for it" in said[0]
    assert "Node w9" in (worker.not_ready_reason() or "")

    w9 = "---\napiVersion: v1\nkind: Node\nmetadata: {name: w9}\n"
    w9 += "status: {addresses: [{type: InternalIP, address: 203.0.113.9}]}\n"
    worker.snapshot = snapshot_of(NODES + w9 + "---\n" + CLUSTER)
    assert worker.reconcile()
    assert datapath.local == IP("203.0.113.9") and worker.not_ready_reason() is None


def test_nothing_is_applied_before_the_holders_are_read() -> None:
    holders = FakeHolders(read=False)
    worker, datapath, _ = agent(holders)
    worker.snapshot = FULL
    assert not worker.reconcile()
    assert datapath.calls == []
    assert worker.not_ready_reason() == "waiting for the first read of the egress IP holders"


def test_a_failed_apply_keeps_the_previous_plan_and_is_tried_again() -> None:
    worker, datapath, _ = agent()
    worker.snapshot = FULL
    assert worker.reconcile()
    first = datapath.in_force
    datapath.fail_with = OSError("netlink said no")
    worker.snapshot = snapshot_of(NODES + "---\n" + CLUSTER + API_2)
    with pytest.raises(OSError):
        worker.reconcile()
    assert worker.applied is not None and worker.applied.plan == first
    datapath.fail_with = None
    assert worker.reconcile()  # the same desired state, tried again, is applied


def test_backoff_doubles_up_to_its_bound_and_starts_over_after_a_success() -> None:
    backoff = Backoff(1.0, 8.0)
    assert [backoff.failed() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    backoff.succeeded()
    assert backoff.failed() == 1.0


# -- the loop: coalesced, never waiting for the kernel ----------------------------------------


def test_changes_during_an_apply_are_coalesced_and_readyz_answers_meanwhile() -> None:
    worker, datapath, feed = agent()
    datapath.gate = threading.Event()

    async def scenario() -> None:
        steering = asyncio.create_task(worker.steer())
        async with TestClient(TestServer(worker.web_app(), host="127.0.0.1")) as client:
            try:
                feed.put(FULL)
                assert await asyncio.to_thread(datapath.entered.wait, 10)
                # the kernel is busy with the first apply; the loop is not
                feed.put(replace(FULL, pods=tuple(p for p in FULL.pods if p.name != "etl-0")))
                latest = snapshot_of(NODES + "---\n" + CLUSTER + API_2)
                feed.put(latest)
                reply = await client.get("/readyz")
                assert (reply.status, await reply.text()) == (
                    503,
                    "not ready: desired state not loaded yet\n",
                )
                assert (await client.get("/healthz")).status == 200
                for _ in range(100):  # bounded: until the loop has taken both snapshots
                    if worker.snapshot is latest:
                        break
                    await asyncio.sleep(0)
                assert worker.snapshot is latest
                assert datapath.gate is not None
                datapath.gate.set()
                assert await asyncio.to_thread(datapath.wait_applied, 2)
                for _ in range(100):  # bounded: until the loop has seen the last apply
                    if (await client.get("/readyz")).status == 200:
                        break
                    await asyncio.sleep(0.01)
                assert (await client.get("/readyz")).status == 200
            finally:
                worker.request_stop()
                assert await asyncio.wait_for(steering, 10) == 0
        assert len(datapath.applied) == 2  # the first, then one for both later snapshots
        assert IP("192.0.2.12") in datapath.applied[-1].steered

    asyncio.run(scenario())


def test_a_failed_apply_shows_in_readyz_and_the_next_change_retries_it_at_once() -> None:
    holders = FakeHolders(LEASES)
    worker, datapath, feed = agent(holders)
    datapath.fail_with = OSError("no VXLAN here")
    errors = sample("egressgw_agent_apply_errors_total")

    async def scenario() -> None:
        steering = asyncio.create_task(worker.steer())
        try:
            feed.put(FULL)
            for _ in range(500):  # bounded: until the failure is recorded
                if worker.failure is not None:
                    break
                await asyncio.sleep(0.01)
            assert worker.not_ready_reason() == (
                "the steering plan could not be applied (no VXLAN here); retrying"
            )
            datapath.fail_with = None
            holders.set({**LEASES, PAYMENTS4: "gw-b"})  # a change: tried again now, not later
            assert await asyncio.to_thread(datapath.wait_applied, 1)
        finally:
            worker.request_stop()
            assert await asyncio.wait_for(steering, 10) == 0
        assert datapath.applied[-1].next_hops[("payments", 4)] == GW_B

    asyncio.run(scenario())
    assert sample("egressgw_agent_apply_errors_total") >= errors + 1
    assert "remove" not in datapath.calls  # stopping never removes what is in force


def test_metrics_show_steered_addresses_next_hops_and_fail_closed_families() -> None:
    worker, datapath, _ = agent()
    worker.snapshot = FULL
    worker.reconcile()
    datapath.dropped_packets = 7
    metrics.AGENT.bind(worker.report)
    try:
        lines = generate_latest().decode().splitlines()
    finally:
        metrics.AGENT.unbind()
    for line in (
        'egressgw_agent_steered_addresses{gateway="payments"} 2.0',
        'egressgw_agent_steered_addresses{gateway="analytics"} 2.0',
        'egressgw_agent_next_hop_info{family="IPv4",gateway="payments",node="gw-a"} 1.0',
        'egressgw_agent_next_hop_info{family="IPv6",gateway="payments",node="gw-a"} 1.0',
        'egressgw_agent_next_hop_info{family="IPv4",gateway="analytics",node="gw-b"} 1.0',
        'egressgw_agent_fail_closed{family="IPv6",gateway="analytics"} 1.0',
        'egressgw_agent_fail_closed{family="IPv4",gateway="analytics"} 0.0',
        "egressgw_agent_dropped_packets_total 7.0",
    ):
        assert line in lines, line


def test_build_agent_wires_the_source_and_the_holders_it_is_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    datapath = FakeAgentDatapath()
    seen: list[tuple[object, ...]] = []

    def fake_datapath(*args: object) -> FakeAgentDatapath:
        seen.append(args)
        return datapath

    monkeypatch.setattr(app, "agent_datapath", fake_datapath)
    holders, feed = FakeHolders(LEASES), SnapshotFeed()
    built = app.build_agent(settings(), source=feed, holders=holders)
    assert built.agent.datapath is datapath and built.agent.holders is holders
    assert seen[0][1:] == (
        settings().cluster_cidrs,
        settings().dns_addresses,
        "egressgw_agent",
        None,
    )
    manifests = app.build_agent(AgentSettings("w1", settings().cluster_cidrs, manifests=tmp_path))
    assert manifests.agent.holders is None  # manifests mode: the Nodes in them say


# -- a gateway node (--node-name) ---------------------------------------------------------------


def test_a_gateway_node_holds_only_the_egress_ips_its_node_is_given() -> None:
    node = GatewayNode("gw-b", FakeGatewayTunnel, manifests=True)
    node.see(FULL)
    plan = build(FULL, IdentityRegistry(), node.holds)
    assert plan.desired.egress_ips == {ANALYTICS4}
    assert manifest_holders(FULL) == LEASES


def test_a_gateway_node_accepts_from_the_tunnel_exactly_its_pods_and_redirects_their_dns() -> None:
    tunnels: list[FakeGatewayTunnel] = []

    def make() -> FakeGatewayTunnel:
        tunnels.append(FakeGatewayTunnel())
        return tunnels[-1]

    node = GatewayNode("gw-a", make, [("0.0.0.0", 5353)], manifests=True)
    node.see(FULL)
    peers = node.sync(FULL, {PAYMENTS4, PAYMENTS6})
    (tunnel,) = tunnels
    assert tunnel.calls == ["setup", "apply"]
    # a wildcard listener is reached at this node's tunnel address
    assert (tunnel.dns, tunnel.local) == (((GW_A, 5353),), GW_A)
    # payments' pods, each only from the node it runs on; not analytics', whose IP gw-b holds
    assert peers is not None and dict(peers.pods) == {
        IP("192.0.2.10"): W1,
        IP("2001:db8:1::10"): W1,
        IP("192.0.2.11"): IP("203.0.113.2"),
    }
    node.sync(FULL, {PAYMENTS4, PAYMENTS6})
    assert tunnel.calls == ["setup", "apply"]  # nothing new: nothing applied
    assert sample("egressgw_tunnel_pod_addresses") == 3
    assert sample("egressgw_tunnel_peers") == 2


def test_manifests_without_nodes_hold_every_egress_ip_as_before_and_build_no_tunnel() -> None:
    old = replace(FULL, nodes=())
    made: list[FakeGatewayTunnel] = []

    def make() -> FakeGatewayTunnel:
        made.append(FakeGatewayTunnel())
        return made[-1]

    node = GatewayNode("gw-a", make, manifests=True)
    node.see(old)
    plan = build(old, IdentityRegistry(), node.holds)
    assert plan.desired.egress_ips == {PAYMENTS4, PAYMENTS6, ANALYTICS4}
    assert node.sync(old, plan.desired.egress_ips) is None and made == []


def test_a_gateway_node_missing_from_the_manifests_holds_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    node = GatewayNode("gw-z", FakeGatewayTunnel, manifests=True)
    with caplog.at_level(logging.WARNING, logger="egressgw"):
        node.see(FULL)
        node.see(FULL)
    assert build(FULL, IdentityRegistry(), node.holds).desired.egress_ips == set()
    assert [r.getMessage() for r in caplog.records] == [
        "--node-name gw-z: no Node of that name in the manifests; this node holds no egress IP"
    ]


def test_in_kubernetes_mode_the_tunnel_follows_what_the_leases_say() -> None:
    tunnel = FakeGatewayTunnel()
    node = GatewayNode("gw-b", lambda: tunnel, manifests=False, others=lambda: LEASES)
    node.see(FULL)  # the Leases decide what is held, not the snapshot
    peers = node.sync(FULL, {ANALYTICS4})
    assert peers is not None and dict(peers.pods) == {IP("192.0.2.20"): W1}
    # the Lease of payments' IPv4 address moved to this node
    peers = node.sync(FULL, {ANALYTICS4, PAYMENTS4})
    assert peers is not None and set(peers.pods) == {
        IP("192.0.2.20"),
        IP("192.0.2.10"),
        IP("192.0.2.11"),
    }
    assert tunnel.calls == ["setup", "apply", "apply"]


def test_build_gateway_with_a_node_name_uses_the_node_for_ownership_and_the_dns_address() -> None:
    gateway = app.build_gateway(
        Settings(
            uplink="up0",
            node_name="gw-a",
            dns_listen=(("203.0.113.11", 53),),
            upstreams=(("192.0.2.53", 53),),
        ),
        source=SnapshotFeed(),
    )
    node = gateway.daemon.gateway_node
    assert node is not None and gateway.daemon.ownership is node
    assert node.dns_listen == (("203.0.113.11", 53),)
    plain = app.build_gateway(Settings(uplink="up0"), source=SnapshotFeed())
    assert plain.daemon.gateway_node is None  # without --node-name: as before


def _egress_ips_csv(daemon: Daemon) -> list[tuple[str, str, str]]:
    """(egress IP, held, node) of each row, as ``egressgw egress-ips --url ... --format csv``
    prints what the daemon's /v1/egress-ips serves."""
    text = format_rows(from_json(daemon.egress_ips()), "csv")
    return [
        (row["egress_ip"], row["held"], row["node"]) for row in csv.DictReader(io.StringIO(text))
    ]


def test_egress_ips_names_the_node_that_holds_each_ip_not_the_node_asked() -> None:
    # Manifests with Nodes: gw-a holds payments' IPs, gw-b analytics'. Ask gw-a.
    gateway = app.build_gateway(Settings(uplink="up0", node_name="gw-a"), source=SnapshotFeed())
    daemon, node = gateway.daemon, gateway.daemon.gateway_node
    assert node is not None
    node.see(FULL)  # as an apply does, before it records what it holds
    daemon.last_snapshot, daemon.held = FULL, {PAYMENTS4, PAYMENTS6}
    assert _egress_ips_csv(daemon) == [
        ("198.51.100.20", "no", "gw-b"),
        ("198.51.100.10", "yes", "gw-a"),
        ("2001:db8:100::10", "yes", "gw-a"),
    ]


def test_in_kubernetes_mode_egress_ips_names_the_lease_holder_or_nobody() -> None:
    # gw-b holds analytics' IP; payments' IPv4 Lease names gw-a; its IPv6 one has no Lease yet
    leases = {PAYMENTS4: "gw-a", ANALYTICS4: "gw-b"}
    daemon = app.build_gateway(Settings(uplink="up0"), source=SnapshotFeed()).daemon
    daemon.gateway_node = GatewayNode(
        "gw-b", FakeGatewayTunnel, manifests=False, others=lambda: leases
    )
    daemon.last_snapshot, daemon.held = FULL, {ANALYTICS4}
    assert _egress_ips_csv(daemon) == [
        ("198.51.100.20", "yes", "gw-b"),
        ("198.51.100.10", "no", "gw-a"),
        ("2001:db8:100::10", "no", "-"),
    ]


def test_without_a_node_name_egress_ips_names_this_node_only_for_what_it_holds() -> None:
    daemon = app.build_gateway(Settings(uplink="up0"), source=SnapshotFeed()).daemon
    daemon.last_snapshot, daemon.held = FULL, {PAYMENTS4, ANALYTICS4}
    host = socket.gethostname()
    assert _egress_ips_csv(daemon) == [
        ("198.51.100.20", "yes", host),
        ("198.51.100.10", "yes", host),
        ("2001:db8:100::10", "no", "-"),
    ]


def test_the_tunnels_dns_goes_to_the_first_listen_address_of_each_family() -> None:
    listen = [("::", 53), ("192.0.2.53", 53), ("192.0.2.54", 53), ("2001:db8::53", 5353)]
    node = GatewayNode("gw-a", FakeGatewayTunnel, listen, manifests=True)
    # the IPv6 wildcard has no IPv6 tunnel address to stand for: the next IPv6 address is used
    assert node.dns_redirect(GW_A) == [(IP("192.0.2.53"), 53), (IP("2001:db8::53"), 5353)]
    assert GatewayNode("gw-a", FakeGatewayTunnel, manifests=True).dns_redirect(GW_A) == []
