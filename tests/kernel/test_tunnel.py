"""Worker -> tunnel -> gateway on the real kernel: what a pod, the external server and the node
network see.

A small cluster in network namespaces (every name unique, all removed afterwards, also on
failure; nothing in the root namespace):

  pods (cni0 bridges, host-gw routes between workers; a Flannel-like masquerade on each worker)
    wA: pA1 192.0.2.10 (payments), pA2 192.0.2.11 (unselected), pA3 192.0.2.12 (no holder)
    wB: pB1 192.0.2.74 (payments)            IPv6: 2001:db8:10:a::/64 and 2001:db8:10:b::/64
  node network 198.51.100.0/26, 2001:db8:20::/64 (bridge brn in the fabric namespace):
    wA .1, wB .2, gateway g1 .11, gateway g2 .12, fabric router .62
  external network 203.0.113.0/25, 2001:db8:30::/64 (bridge bre): g1 up0 .1 (egress IP .10),
    g2 up0 .2 (egress IP .20), router .126, server .100 with TCP and UDP echo on port 8000.
    The server routes back to the node network, not to pods: a leak shows as a node address.

Each gateway runs the gateway skeleton (NftDatapath) with the tunnel (GatewayTunnel) and a UDP
and TCP stand-in for the DNS interceptor on its node address, port 5353. Each worker runs
AgentDatapath. Tests restore the baseline plans at their start. A second, smaller topology
(``six``) has IPv6-only nodes: the tunnel's outer packets are IPv6 there.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from egressgw.datapath.addresses import UplinkAddresses
from egressgw.datapath.agent import AgentDatapath, SteeringSettings
from egressgw.datapath.kernel import GatewayTunnel, NftDatapath
from egressgw.datapath.netns import call_in
from egressgw.datapath.state import DesiredState
from egressgw.datapath.tunnel import TunnelSettings, link_local_for, mac_for
from egressgw.lab.forge import TCP_FLAGS, ip_packet, send_tunnelled, tcp_segment, vxlan_frame
from egressgw.steering import AgentPlan, TunnelPeers
from tests.conftest import require_kernel, unique_name
from tests.kernel.topology import ip, links_up, sysctl, tcp_listener
from tests.unit.test_reference_cycles import cyclic_garbage

A = ipaddress.ip_address
N = ipaddress.ip_network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

WA, WB, G1, G2 = A("198.51.100.1"), A("198.51.100.2"), A("198.51.100.11"), A("198.51.100.12")
G1_6, G2_6 = A("2001:db8:20::11"), A("2001:db8:20::12")
PODS = {  # name -> (worker, v4, v6)
    "pA1": ("wA", A("192.0.2.10"), A("2001:db8:10:a::10")),
    "pA2": ("wA", A("192.0.2.11"), A("2001:db8:10:a::11")),
    "pA3": ("wA", A("192.0.2.12"), A("2001:db8:10:a::12")),
    "pB1": ("wB", A("192.0.2.74"), A("2001:db8:10:b::74")),
}
SERVER = {4: "203.0.113.100", 6: "2001:db8:30::100"}
EGRESS = {"g1": {4: A("203.0.113.10"), 6: A("2001:db8:30::10")},
          "g2": {4: A("203.0.113.20"), 6: A("2001:db8:30::20")}}  # fmt: skip
DNS = {4: A("192.0.2.253"), 6: A("2001:db8:10:53::53")}
CLUSTER = [N("192.0.2.0/24"), N("198.51.100.0/26"), N("2001:db8:10::/48"), N("2001:db8:20::/64")]
PORT = 8000
MSS_PORT = 8001
DNS_STAND_IN_PORT = 5353
PAYMENTS = 7
TUNNEL = TunnelSettings()


def addr(pod: str, family: int) -> IPAddress:
    return PODS[pod][1] if family == 4 else PODS[pod][2]


def run(ns: str, *argv: str) -> str:
    proc = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {ns}: {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class UdpEcho:
    """A UDP server in a namespace that records each sender and sends the datagram back."""

    sock: socket.socket
    peers: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, ns: str, address: str, port: int) -> UdpEcho:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET

        def make() -> socket.socket:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.bind((address, port))
            return sock

        echo = cls(call_in(ns, make))
        threading.Thread(target=echo._serve, daemon=True).start()
        return echo

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(2048)
            except OSError:
                return
            self.peers.append(peer[0])
            self.sock.sendto(data, peer)


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)


@dataclass
class Cluster:
    ns: dict[str, str]
    agents: dict[str, AgentDatapath] = field(default_factory=dict)
    gateways: dict[str, NftDatapath] = field(default_factory=dict)
    tunnels: dict[str, GatewayTunnel] = field(default_factory=dict)
    closers: list[Callable[[], None]] = field(default_factory=list)
    tcp_peers: list[str] = field(default_factory=list)  # sources the server saw, TCP
    udp: list[UdpEcho] = field(default_factory=list)
    server_udp: dict[int, UdpEcho] = field(default_factory=dict)
    dns_peers: dict[str, list[str]] = field(default_factory=dict)  # gateway -> sources seen
    pod_peers: list[str] = field(default_factory=list)  # sources pB1's server saw
    cluster_dns_peers: list[str] = field(default_factory=list)  # the cluster DNS (on pB1)
    mss: list[int] = field(default_factory=list)  # TCP MSS the server has for its peers

    def record_mss(self, conn: socket.socket) -> None:
        self.mss.append(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG))
        _echo(conn)

    def close(self) -> None:
        for closer in reversed(self.closers):
            with contextlib.suppress(Exception):  # the namespaces go below, whatever happened
                closer()
        for echo in self.udp:
            echo.sock.close()
        for name in self.ns.values():
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)

    # plans

    def agent_plan(self, worker: str, hop: IPAddress | None = G1, **steered: str) -> AgentPlan:
        chosen = (
            steered
            or {
                "wA": {"pA1": "payments", "pA3": "nohop"},
                "wB": {"pB1": "payments"},
            }[worker]
        )
        pods = {addr(p, f): gw for p, gw in chosen.items() for f in (4, 6)}
        hops = {("payments", f): hop for f in (4, 6)} if hop is not None else {}
        local = WA if worker == "wA" else WB
        return AgentPlan(node=worker, local=local, steered=pods, next_hops=hops)

    def peers(self, gateway: str, **placed: str) -> TunnelPeers:
        where = placed or {"pA1": "wA", "pB1": "wB"}
        nodes = {"wA": WA, "wB": WB}
        pods = {addr(p, f): nodes[w] for p, w in where.items() for f in (4, 6)}
        return TunnelPeers(node=gateway, local=G1 if gateway == "g1" else G2, pods=pods)

    def baseline(self) -> None:
        for worker, agent in self.agents.items():
            agent.apply(self.agent_plan(worker))
        for gateway, tunnel in self.tunnels.items():
            tunnel.apply(self.peers(gateway))

    # traffic

    def connect(self, pod: str, family: int, host: str | None = None, port: int = PORT,
                timeout: float = 2.0) -> socket.socket:  # fmt: skip
        target = host or SERVER[family]
        return call_in(self.ns[pod], lambda: socket.create_connection((target, port), timeout))

    def tcp_roundtrip(self, pod: str, family: int, source: IPAddress | None = None) -> str:
        """Connect from ``pod`` to the server, echo a line; the source the server saw."""
        before = len(self.tcp_peers)

        def exchange() -> None:
            fam = socket.AF_INET if family == 4 else socket.AF_INET6
            with socket.socket(fam, socket.SOCK_STREAM) as sock:
                sock.settimeout(2.0)
                if source is not None:
                    sock.bind((str(source), 0))
                sock.connect((SERVER[family], PORT))
                sock.sendall(b"ping\n")
                assert sock.recv(16) == b"ping\n"

        call_in(self.ns[pod], exchange)
        assert len(self.tcp_peers) == before + 1
        return self.tcp_peers[-1]

    def udp_roundtrip(self, pod: str, family: int, host: str | None = None,
                      port: int = PORT) -> tuple[str, int]:  # fmt: skip
        """One datagram from ``pod`` and its echo; the address the answer came from."""
        target = host or SERVER[family]

        def exchange() -> tuple[str, int]:
            fam = socket.AF_INET if family == 4 else socket.AF_INET6
            with socket.socket(fam, socket.SOCK_DGRAM) as sock:
                sock.settimeout(2.0)
                sock.sendto(b"hello", (target, port))
                data, peer = sock.recvfrom(64)
                assert data == b"hello"
                return peer[0], peer[1]

        return call_in(self.ns[pod], exchange)

    def tcp_exchange_dns(self, pod: str, family: int) -> None:
        """A TCP connection to the DNS address, port 53, that echoes one line."""
        with self.connect(pod, family, host=str(DNS[family]), port=53) as conn:
            conn.sendall(b"query\n")
            assert conn.recv(16) == b"query\n"
            assert conn.getpeername()[0] == str(DNS[family])

    def nft_counters(self, node: str, table: str, chain: str) -> int:
        return counted(self.ns[node], table, chain)


def counted(ns: str, table: str, chain: str) -> int:
    """Packets counted by the anonymous counters of one chain."""
    listing = json.loads(run(ns, "nft", "-j", "list", "chain", "inet", table, chain))
    total = 0
    for entry in listing["nftables"]:
        for statement in entry.get("rule", {}).get("expr", []):
            if "counter" in statement:
                total += int(statement["counter"]["packets"])
    return total


def _veth(ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
    ip(ns_a, "link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", ns_b)


def _addresses(ns: str, dev: str, *cidrs: str) -> None:
    for cidr in cidrs:
        ip(ns, "addr", "add", cidr, "dev", dev, *(["nodad"] if ":" in cidr else []))
    ip(ns, "link", "set", dev, "up")


def build() -> Cluster:
    require_kernel()
    tag = unique_name("egv")
    names = ["fab", "ext", "wA", "wB", "g1", "g2", *PODS]
    cluster = Cluster(ns={n: f"{tag}-{n}" for n in names})
    ns = cluster.ns
    try:
        for name in ns.values():
            subprocess.run(["ip", "netns", "add", name], check=True)
            ip(name, "link", "set", "lo", "up")
            for key in ("all", "default"):
                sysctl(name, f"net.ipv6.conf.{key}.accept_dad", "0")
        fab = ns["fab"]
        for bridge in ("brn", "bre"):
            ip(fab, "link", "add", bridge, "type", "bridge")
        _addresses(fab, "brn", "198.51.100.62/26", "2001:db8:20::62/64")
        _addresses(fab, "bre", "203.0.113.126/25", "2001:db8:30::126/64")
        sysctl(fab, "net.ipv4.ip_forward", "1")
        sysctl(fab, "net.ipv6.conf.all.forwarding", "1")
        ports = {"wA": "1", "wB": "2", "g1": "11", "g2": "12"}
        for node, host in ports.items():
            _veth(ns[node], "eth0", fab, f"n-{node}")
            ip(fab, "link", "set", f"n-{node}", "master", "brn", "up")
            _addresses(ns[node], "eth0", f"198.51.100.{host}/26", f"2001:db8:20::{host}/64")
            sysctl(ns[node], "net.ipv4.ip_forward", "1")
            sysctl(ns[node], "net.ipv6.conf.all.forwarding", "1")
            sysctl(ns[node], "net.ipv4.conf.all.rp_filter", "1")  # strict, as many nodes run
        for gateway, host in (("g1", "1"), ("g2", "2")):
            _veth(ns[gateway], "up0", fab, f"e-{gateway}")
            ip(fab, "link", "set", f"e-{gateway}", "master", "bre", "up")
            _addresses(ns[gateway], "up0", f"203.0.113.{host}/25", f"2001:db8:30::{host}/64")
        _veth(ns["ext"], "eth0", fab, "e-ext")
        ip(fab, "link", "set", "e-ext", "master", "bre", "up")
        _addresses(ns["ext"], "eth0", "203.0.113.100/25", "2001:db8:30::100/64")
        ip(ns["ext"], "route", "add", "198.51.100.0/26", "via", "203.0.113.126")
        ip(ns["ext"], "-6", "route", "add", "2001:db8:20::/64", "via", "2001:db8:30::126")
        subnets = {"wA": ("192.0.2.1/26", "2001:db8:10:a::1/64"),
                   "wB": ("192.0.2.65/26", "2001:db8:10:b::1/64")}  # fmt: skip
        for worker, (v4, v6) in subnets.items():
            w = ns[worker]
            ip(w, "link", "add", "cni0", "type", "bridge")
            _addresses(w, "cni0", v4, v6)
            ip(w, "route", "add", "default", "via", "198.51.100.62")
            ip(w, "-6", "route", "add", "default", "via", "2001:db8:20::62")
            # a Flannel-like masquerade of pod traffic leaving the pod network, and a
            # kube-proxy-like DNAT of the cluster DNS service to the DNS pod pB1
            script = (
                "add table inet cni\n"
                "add chain inet cni post { type nat hook postrouting priority srcnat; }\n"
                "add rule inet cni post ip saddr 192.0.2.0/24 ip daddr != 192.0.2.0/24 "
                "masquerade\n"
                "add rule inet cni post ip6 saddr 2001:db8:10::/48 ip6 daddr != 2001:db8:10::/48"
                " masquerade\n"
                "add chain inet cni pre { type nat hook prerouting priority dstnat; }\n"
                f"add rule inet cni pre ip daddr {DNS[4]} meta l4proto {{ tcp, udp }} "
                f"th dport 53 dnat ip to {addr('pB1', 4)}\n"
                f"add rule inet cni pre ip6 daddr {DNS[6]} meta l4proto {{ tcp, udp }} "
                f"th dport 53 dnat ip6 to {addr('pB1', 6)}\n"
            )
            subprocess.run(
                ["ip", "netns", "exec", w, "nft", "-f", "-"], input=script, text=True, check=True
            )
        ip(ns["wA"], "route", "add", "192.0.2.64/26", "via", "198.51.100.2")
        ip(ns["wA"], "-6", "route", "add", "2001:db8:10:b::/64", "via", "2001:db8:20::2")
        ip(ns["wB"], "route", "add", "192.0.2.0/26", "via", "198.51.100.1")
        ip(ns["wB"], "-6", "route", "add", "2001:db8:10:a::/64", "via", "2001:db8:20::1")
        for index, (pod, (worker, pod4, pod6)) in enumerate(PODS.items()):
            w, p = ns[worker], ns[pod]
            _veth(p, "eth0", w, f"veth{index}")
            ip(w, "link", "set", f"veth{index}", "master", "cni0", "up")
            gw4, gw6 = ("192.0.2.1", "2001:db8:10:a::1") if worker == "wA" else (
                "192.0.2.65", "2001:db8:10:b::1")  # fmt: skip
            _addresses(p, "eth0", f"{pod4}/26", f"{pod6}/64")
            ip(p, "route", "add", "default", "via", gw4)
            ip(p, "-6", "route", "add", "default", "via", gw6)
        links_up(*ns.values())
        # servers
        for family in (4, 6):
            cluster.closers.append(
                tcp_listener(ns["ext"], SERVER[family], PORT, cluster.tcp_peers, _echo).close
            )
            cluster.server_udp[family] = UdpEcho.start(ns["ext"], SERVER[family], PORT)
            cluster.udp.append(cluster.server_udp[family])
            cluster.closers.append(
                tcp_listener(
                    ns["pB1"], str(addr("pB1", family)), PORT, cluster.pod_peers, _echo
                ).close
            )
            cluster.closers.append(
                tcp_listener(ns["ext"], SERVER[family], MSS_PORT, [], cluster.record_mss).close
            )
            cluster_dns = UdpEcho.start(ns["pB1"], str(addr("pB1", family)), 53)
            cluster_dns.peers = cluster.cluster_dns_peers
            cluster.udp.append(cluster_dns)
        for gateway, listens in {"g1": (G1, G1_6), "g2": (G2, G2_6)}.items():
            seen = cluster.dns_peers.setdefault(gateway, [])
            for listen in listens:
                echo = UdpEcho.start(ns[gateway], str(listen), DNS_STAND_IN_PORT)
                echo.peers = seen
                cluster.udp.append(echo)
                tcp = tcp_listener(ns[gateway], str(listen), DNS_STAND_IN_PORT, seen, _echo)
                cluster.closers.append(tcp.close)
        # gateways: the skeleton, one identity allowed everywhere, and the tunnel
        for gateway, local, local6 in (("g1", G1, G1_6), ("g2", G2, G2_6)):
            datapath = NftDatapath("egressgw", "up0", netns=ns[gateway])
            cluster.closers.append(datapath.close)
            datapath.adopt()
            state = gateway_state(EGRESS[gateway])
            datapath.reconcile(state)
            uplink = UplinkAddresses("up0", netns=ns[gateway])
            uplink.sync(state.egress_ips, set())
            uplink.close()
            tunnel = GatewayTunnel(TUNNEL, "egressgw", "up0", netns=ns[gateway])
            cluster.closers.append(tunnel.close)
            tunnel.setup(local, [(local, DNS_STAND_IN_PORT), (local6, DNS_STAND_IN_PORT)])
            cluster.gateways[gateway] = datapath
            cluster.tunnels[gateway] = tunnel
        for worker, local in (("wA", WA), ("wB", WB)):
            agent = AgentDatapath(TUNNEL, CLUSTER, list(DNS.values()), netns=ns[worker])
            cluster.closers.append(agent.close)
            agent.setup(local)
            cluster.agents[worker] = agent
        cluster.baseline()
    except BaseException:
        cluster.close()
        raise
    return cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    built = build()
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
def fresh(cluster: Cluster) -> Cluster:
    cluster.baseline()
    return cluster


# --- steered traffic ---------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_a_steered_pod_leaves_through_its_gateway_with_the_egress_ip(
    fresh: Cluster, family: int
) -> None:
    assert fresh.tcp_roundtrip("pA1", family) == str(EGRESS["g1"][family])
    assert fresh.tcp_roundtrip("pB1", family) == str(EGRESS["g1"][family])
    echo = fresh.server_udp[family]
    before = len(echo.peers)
    assert fresh.udp_roundtrip("pA1", family) == (SERVER[family], PORT)
    assert echo.peers[before:] == [str(EGRESS["g1"][family])]


def test_outer_tunnel_packets_cost_no_conntrack_entry_on_either_node(fresh: Cluster) -> None:
    # every inner flow hashes to an outer source port of its own: tracked, each tunnelled
    # connection would hold a second conntrack entry on the worker and on the gateway
    for family in (4, 6):
        assert fresh.tcp_roundtrip("pA1", family) == str(EGRESS["g1"][family])
    for node in ("wA", "g1"):
        listed = run(fresh.ns[node], "conntrack", "-L", "-p", "udp", "--dport", str(TUNNEL.port))
        assert f"dport={TUNNEL.port}" not in listed, (node, listed)
        inner = run(fresh.ns[node], "conntrack", "-L", "-p", "tcp", "--dport", str(PORT))
        assert f"dport={PORT}" in inner, (node, inner)  # the inner flow itself is tracked


@pytest.mark.parametrize("family", [4, 6])
def test_unselected_pods_and_cluster_traffic_keep_their_path(fresh: Cluster, family: int) -> None:
    # the unselected pod leaves through its node (masqueraded by the CNI): the node's address
    node = str(WA) if family == 4 else "2001:db8:20::1"
    assert fresh.tcp_roundtrip("pA2", family) == node
    # pod to pod, even from a steered pod: direct, with the pod's own source
    before = len(fresh.pod_peers)
    with fresh.connect("pA1", family, host=str(addr("pB1", family))) as conn:
        conn.sendall(b"x\n")
        assert conn.recv(4) == b"x\n"
    assert fresh.pod_peers[before:] == [str(addr("pA1", family))]


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_through_the_tunnel_is_clamped_to_its_mtu_and_carries_bulk_data(
    fresh: Cluster, family: int
) -> None:
    inner = 1450 - (20 if family == 4 else 40) - 20  # the tunnel's MTU less inner IP and TCP
    payload = bytes(range(256)) * 1024  # 256 KiB, echoed back
    with fresh.connect("pA1", family, port=MSS_PORT) as conn:
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) <= inner
        conn.settimeout(5.0)
        conn.sendall(payload)
        received = bytearray()
        while len(received) < len(payload):
            chunk = conn.recv(65536)
            assert chunk, "the server closed early"
            received += chunk
        assert bytes(received) == payload
    assert fresh.mss[-1] <= inner


@pytest.mark.parametrize("family", [4, 6])
def test_a_pod_whose_gateway_has_no_holder_is_dropped_on_the_worker(
    fresh: Cluster, family: int
) -> None:
    before_tcp, dropped = len(fresh.tcp_peers), fresh.agents["wA"].dropped()
    with pytest.raises(OSError):
        fresh.connect("pA3", family, timeout=1.0).close()
    assert fresh.tcp_peers[before_tcp:] == []  # nothing arrived, least of all the node address
    assert fresh.agents["wA"].dropped() > dropped


def test_a_gateway_losing_its_holder_fails_closed_and_recovers(fresh: Cluster) -> None:
    fresh.agents["wA"].apply(fresh.agent_plan("wA", hop=None))
    before = len(fresh.tcp_peers)
    with pytest.raises(OSError):
        fresh.connect("pA1", 4, timeout=1.0).close()
    assert fresh.tcp_peers[before:] == []
    # the routing backstop: past the nft drop, a marked packet would find no route either
    table = str(SteeringSettings().table_base + fresh.agents["wA"].gateways()["payments"])
    assert run(fresh.ns["wA"], "ip", "route", "show", "table", table) == ""
    assert run(fresh.ns["wA"], "ip", "-6", "route", "show", "table", table) == ""
    assert "not from all fwmark 0/0x7f blackhole" in run(fresh.ns["wA"], "ip", "rule")
    fresh.agents["wA"].apply(fresh.agent_plan("wA"))
    assert fresh.tcp_roundtrip("pA1", 4) == str(EGRESS["g1"][4])


# --- DNS -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_dns_of_a_steered_pod_reaches_the_gateway_and_answers_from_the_address_asked(
    fresh: Cluster, family: int
) -> None:
    seen = fresh.dns_peers["g1"]
    before = len(seen)
    assert fresh.udp_roundtrip("pA1", family, host=str(DNS[family]), port=53) == (
        str(DNS[family]),
        53,
    )
    fresh.tcp_exchange_dns("pA1", family)
    assert seen[before:] == [str(addr("pA1", family))] * 2
    # an unselected pod's DNS takes the node's path to the cluster DNS (the service DNAT)
    assert fresh.udp_roundtrip("pA2", family, host=str(DNS[family]), port=53) == (
        str(DNS[family]),
        53,
    )
    assert str(addr("pA2", family)) in fresh.cluster_dns_peers
    assert str(addr("pA1", family)) not in fresh.cluster_dns_peers
    assert str(addr("pA2", family)) not in seen


# --- identity ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_a_pod_borrowing_the_address_of_a_pod_on_another_node_is_dropped_at_the_gateway(
    fresh: Cluster, family: int
) -> None:
    """pA2 on worker A takes pB1's address, and worker A (as if compromised) steers it."""
    ns = fresh.ns
    borrowed = addr("pB1", family)
    prefix = "32" if family == 4 else "128"
    ip(ns["pA2"], "addr", "add", f"{borrowed}/{prefix}", "dev", "eth0", "nodad")
    # worker A forwards what its pod forges, and routes the borrowed address to it
    for key in ("all", "cni0"):
        sysctl(ns["wA"], f"net.ipv4.conf.{key}.rp_filter", "0")
    ip(ns["wA"], "route", "add", f"{borrowed}/{prefix}", "dev", "cni0")
    try:
        lying = fresh.agent_plan("wA")
        steered = dict(lying.steered)
        steered[borrowed] = "payments"
        fresh.agents["wA"].apply(
            AgentPlan(node="wA", local=WA, steered=steered, next_hops=lying.next_hops)
        )
        drops = fresh.nft_counters("g1", "egressgw", "tunnel_check")
        before = len(fresh.tcp_peers)
        with pytest.raises(OSError):
            fresh.tcp_roundtrip("pA2", family, source=borrowed)
        assert fresh.tcp_peers[before:] == []
        assert fresh.nft_counters("g1", "egressgw", "tunnel_check") > drops
        # the real pB1 still works, and the check is what stopped the forger: placing the
        # address on worker A lets the same connection through
        assert fresh.tcp_roundtrip("pB1", family) == str(EGRESS["g1"][family])
        fresh.tunnels["g1"].apply(fresh.peers("g1", pA1="wA", pB1="wA"))
        assert fresh.tcp_roundtrip("pA2", family, source=borrowed) == str(EGRESS["g1"][family])
    finally:
        ip(ns["pA2"], "addr", "del", f"{borrowed}/{prefix}", "dev", "eth0")
        ip(ns["wA"], "route", "del", f"{borrowed}/{prefix}", "dev", "cni0")
        sysctl(ns["wA"], "net.ipv4.conf.all.rp_filter", "1")


def _vxlan(vni: int, inner: bytes) -> bytes:
    return struct.pack("!II", 0x08000000, vni << 8) + inner


def test_other_inner_protocols_and_short_packets_are_dropped_at_the_gateway(
    fresh: Cluster,
) -> None:
    mac_g1, mac_wa = (
        bytes.fromhex(mac_for(G1).replace(":", "")),
        bytes.fromhex(mac_for(WA).replace(":", "")),
    )
    arp = mac_g1 + mac_wa + b"\x08\x06" + bytes(28)
    short = mac_g1 + mac_wa + b"\x08\x00" + bytes(8)  # an IPv4 header cut before its source

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((str(WA), 0))
            for payload in (arp, short):
                sock.sendto(_vxlan(TUNNEL.vni, payload), (str(G1), TUNNEL.port))

    drops = fresh.nft_counters("g1", "egressgw", "tunnel_check")
    call_in(fresh.ns["wA"], send)
    time.sleep(0.2)
    assert fresh.nft_counters("g1", "egressgw", "tunnel_check") == drops + 2


def test_a_worker_takes_tunnel_packets_only_from_the_gateways_it_steers_to(
    fresh: Cluster,
) -> None:
    """Worker B is no gateway of worker A's: its tunnel packet toward a steered pod of A is
    dropped and counted on A before it reaches the tunnel device."""
    pod = str(addr("pA1", 4))
    syn = tcp_segment(str(SERVER[4]), pod, PORT, 40000, 0, TCP_FLAGS["syn"])
    frame = vxlan_frame(TUNNEL.vni, mac_for(WB), mac_for(WA), ip_packet(str(SERVER[4]), pod, syn))
    drops = fresh.nft_counters("wA", "egressgw_agent", "untracked_peer")
    call_in(fresh.ns["wB"], lambda: send_tunnelled(str(WB), str(WA), TUNNEL.port, frame, 1, 0))
    time.sleep(0.2)
    assert fresh.nft_counters("wA", "egressgw_agent", "untracked_peer") == drops + 1
    assert fresh.tcp_roundtrip("pA1", 4) == str(EGRESS["g1"][4])  # the gateway's still pass


def test_what_comes_out_of_the_tunnel_leaves_only_through_the_uplink(fresh: Cluster) -> None:
    """A packet of a real pod of worker A, tunnelled toward an address the gateway reaches on
    its node network (worker B) rather than its uplink, is dropped and counted there."""
    pod, sideways = str(addr("pA1", 4)), str(WB)
    syn = tcp_segment(pod, sideways, 40000, 9, 0, TCP_FLAGS["syn"])
    frame = vxlan_frame(TUNNEL.vni, mac_for(WA), mac_for(G1), ip_packet(pod, sideways, syn))

    # reverse-path filtering would refuse it before the rule does (the way back to a pod is
    # known only for what leaves through the uplink): the rule stands without it
    g1 = fresh.ns["g1"]
    saved = {
        k: run(g1, "sysctl", "-n", f"net.ipv4.conf.{k}.rp_filter").strip() for k in ("all", "egw0")
    }
    for key in saved:
        sysctl(g1, f"net.ipv4.conf.{key}.rp_filter", "0")
    try:
        drops = fresh.nft_counters("g1", "egressgw", "outside")
        checked = fresh.nft_counters("g1", "egressgw", "tunnel_check")
        call_in(fresh.ns["wA"], lambda: send_tunnelled(str(WA), str(G1), TUNNEL.port, frame, 1, 0))
        time.sleep(0.2)
        assert fresh.nft_counters("g1", "egressgw", "tunnel_check") == checked  # a real pod
        assert fresh.nft_counters("g1", "egressgw", "outside") == drops + 1
    finally:
        for key, value in saved.items():
            sysctl(g1, f"net.ipv4.conf.{key}.rp_filter", value)


# --- restart and hand-over -------------------------------------------------------------------


def test_an_agent_restart_keeps_an_established_connection(fresh: Cluster) -> None:
    ns = fresh.ns["wA"]
    index = int(run(ns, "cat", "/sys/class/net/egw0/ifindex"))
    with fresh.connect("pA1", 4) as conn:
        conn.sendall(b"one\n")
        assert conn.recv(16) == b"one\n"
        fresh.agents["wA"].close()
        conn.sendall(b"two\n")  # the daemon is down: the kernel keeps steering
        assert conn.recv(16) == b"two\n"
        agent = AgentDatapath(TUNNEL, CLUSTER, list(DNS.values()), netns=ns)
        fresh.agents["wA"] = agent
        fresh.closers.append(agent.close)
        agent.setup(WA)
        conn.sendall(b"three\n")
        assert conn.recv(16) == b"three\n"
        changes = agent.apply(fresh.agent_plan("wA"))
        assert (changes.added, changes.removed) == (0, 0)  # adopted as it was
        conn.sendall(b"four\n")
        assert conn.recv(16) == b"four\n"
    assert int(run(ns, "cat", "/sys/class/net/egw0/ifindex")) == index
    assert "mtu 1450" in run(ns, "ip", "link", "show", "egw0")


def test_a_gateway_restart_keeps_an_established_connection(fresh: Cluster) -> None:
    ns = fresh.ns["g1"]
    index = int(run(ns, "cat", "/sys/class/net/egw0/ifindex"))
    redirect = [(G1, DNS_STAND_IN_PORT), (G1_6, DNS_STAND_IN_PORT)]
    with fresh.connect("pA1", 6) as conn:
        conn.sendall(b"one\n")
        assert conn.recv(16) == b"one\n"
        fresh.tunnels["g1"].close()
        fresh.gateways["g1"].close()
        conn.sendall(b"two\n")
        assert conn.recv(16) == b"two\n"
        datapath = NftDatapath("egressgw", "up0", netns=ns)
        tunnel = GatewayTunnel(TUNNEL, "egressgw", "up0", netns=ns)
        fresh.closers += [datapath.close, tunnel.close]
        fresh.gateways["g1"], fresh.tunnels["g1"] = datapath, tunnel
        datapath.adopt()  # the gateway's own skeleton: its reload keeps the tunnel chains
        assert 'iifname "egw0" counter' in run(
            ns, "nft", "list", "chain", "inet", "egressgw", "outside"
        )
        conn.sendall(b"three\n")
        assert conn.recv(16) == b"three\n"
        tunnel.setup(G1, redirect)
        conn.sendall(b"three and a half\n")
        assert conn.recv(32) == b"three and a half\n"
        changes = tunnel.apply(fresh.peers("g1"))
        assert (changes.added, changes.removed) == (0, 0)
        conn.sendall(b"four\n")
        assert conn.recv(16) == b"four\n"
    assert int(run(ns, "cat", "/sys/class/net/egw0/ifindex")) == index


def test_a_holder_change_moves_new_traffic(fresh: Cluster) -> None:
    assert fresh.tcp_roundtrip("pA1", 4) == str(EGRESS["g1"][4])
    fresh.tunnels["g2"].apply(fresh.peers("g2"))
    started = time.monotonic()
    fresh.agents["wA"].apply(fresh.agent_plan("wA", hop=G2))
    applied = time.monotonic() - started
    for family in (4, 6):
        assert fresh.tcp_roundtrip("pA1", family) == str(EGRESS["g2"][family])
    assert fresh.tcp_roundtrip("pB1", 4) == str(EGRESS["g1"][4])  # worker B did not move
    assert applied < 1.0


def gateway_state(egress: dict[int, IPAddress] | None) -> DesiredState:
    """pA1 and pB1 as one identity, allowed everywhere, SNATed to ``egress`` (None: none held)."""
    state = DesiredState(identities={PAYMENTS: "payments/gw"})
    for pod in ("pA1", "pB1"):
        for family in (4, 6):
            state.workloads[addr(pod, family)] = PAYMENTS
    for family, address in (egress or {}).items():
        state.snat[family][PAYMENTS] = address
        state.egress_ips.add(address)
    state.default_allow = {PAYMENTS}
    return state


def hold(cluster: Cluster, gateway: str, egress: dict[int, IPAddress] | None) -> None:
    """Make ``gateway`` hold ``egress`` (None: nothing) on its uplink and in its SNAT map."""
    previously = set(EGRESS["g1"].values()) | set(EGRESS["g2"].values())
    wanted = set((egress or {}).values())
    uplink = UplinkAddresses("up0", netns=cluster.ns[gateway])
    try:
        if wanted:
            uplink.sync(wanted, previously)
        cluster.gateways[gateway].reconcile(gateway_state(egress))
        if not wanted:
            uplink.sync(wanted, previously)
    finally:
        uplink.close()


def test_an_established_connection_follows_its_egress_ip_to_the_new_holder(
    fresh: Cluster,
) -> None:
    """The hand-over as the control plane makes it: the egress IP moves from g1 to g2, then the
    agent points the gateway at g2. g2 picks the flow up mid-stream (conntrack's loose TCP
    pickup) and SNATs it to the same address and port, so the server sees the same peer."""
    try:
        with fresh.connect("pA1", 4) as conn:
            conn.sendall(b"before\n")
            assert conn.recv(16) == b"before\n"
            hold(fresh, "g1", None)
            hold(fresh, "g2", EGRESS["g1"])
            fresh.agents["wA"].apply(fresh.agent_plan("wA", hop=G2))
            conn.sendall(b"after\n")
            assert conn.recv(16) == b"after\n"
        assert fresh.tcp_roundtrip("pA1", 6) == str(EGRESS["g1"][6])  # a new one, via g2
    finally:
        hold(fresh, "g2", EGRESS["g2"])
        hold(fresh, "g1", EGRESS["g1"])


def test_an_apply_that_changes_nothing_changes_nothing_and_builds_no_cycles(
    fresh: Cluster,
) -> None:
    plan = fresh.agent_plan("wA")
    peers = fresh.peers("g1")
    assert fresh.agents["wA"].apply(plan).added == 0
    assert fresh.tunnels["g1"].apply(peers).added == 0
    found = cyclic_garbage(
        lambda: (fresh.agents["wA"].apply(plan), fresh.tunnels["g1"].apply(peers))
    )
    assert not found, "\n".join(found)


def test_what_the_kernel_holds_for_one_plan(fresh: Cluster) -> None:
    ns = fresh.ns
    steering = SteeringSettings()
    rules = run(ns["wA"], "ip", "rule")
    assert f"from all fwmark 0x1/0x7f lookup {steering.table_base + 1}" in rules
    assert f"from all fwmark 0x2/0x7f lookup {steering.table_base + 2}" in rules
    payments = steering.table_base + fresh.agents["wA"].gateways()["payments"]
    table = run(ns["wA"], "ip", "route", "show", "table", str(payments))
    assert table.strip() == f"default via {G1} dev egw0 proto static onlink"
    table6 = run(ns["wA"], "ip", "-6", "route", "show", "table", str(payments))
    assert f"default via {link_local_for(mac_for(G1))} dev egw0" in table6
    fdb = run(ns["wA"], "bridge", "fdb", "show", "dev", "egw0")
    assert fdb.strip() == f"{mac_for(G1)} dst {G1} self permanent"
    link = run(ns["wA"], "ip", "-d", "link", "show", "egw0")
    assert f"vxlan id {TUNNEL.vni} local {WA}" in link and "nolearning" in link
    assert "mtu 1450" in link and mac_for(WA) in link
    assert run(ns["wA"], "sysctl", "-n", "net.ipv4.conf.egw0.rp_filter").strip() == "2"
    back = run(ns["g1"], "ip", "route", "show", "table", "7795")
    assert f"{addr('pA1', 4)} via {WA} dev egw0 proto static onlink" in back
    assert f"{addr('pB1', 4)} via {WB} dev egw0 proto static onlink" in back
    # the reply table is consulted for replies from the uplink and the gateway's own packets,
    # not for what arrives from the tunnel
    for family in ("-4", "-6"):
        rules = run(ns["g1"], "ip", family, "rule")
        assert "90:\tfrom all iif up0 lookup 7795" in rules
        assert "90:\tfrom all iif lo lookup 7795" in rules
        assert rules.count("7795") == 2
    elements = run(ns["g1"], "nft", "list", "set", "inet", "egressgw", "tunnel4_pods4")
    assert "198.51.100.1 . 0xc000020a" in elements


def test_remove_uninstalls_everything_and_setup_builds_it_again(fresh: Cluster) -> None:
    ns = fresh.ns
    fresh.agents["wA"].remove()
    fresh.tunnels["g1"].remove()
    assert "egw0" not in run(ns["wA"], "ip", "link")
    assert "egressgw_agent" not in run(ns["wA"], "nft", "list", "tables")
    assert "fwmark" not in run(ns["wA"], "ip", "rule")
    assert "7795" not in run(ns["g1"], "ip", "rule")
    assert "tunnel" not in run(ns["g1"], "nft", "list", "table", "inet", "egressgw")
    # the gateway's own table is intact, and an unselected pod never noticed
    assert fresh.tcp_roundtrip("pA2", 4) == str(WA)
    # a forward chain of its own, as an older version had, goes when the tunnel is set up
    run(
        ns["g1"],
        "nft",
        "add chain inet egressgw tunnel_forward { type filter hook forward priority filter; }",
    )
    fresh.tunnels["g1"].setup(G1, [(G1, DNS_STAND_IN_PORT), (G1_6, DNS_STAND_IN_PORT)])
    assert "tunnel_forward" not in run(ns["g1"], "nft", "list", "table", "inet", "egressgw")
    # so do an older agent's postrouting and input chains: forwarded packets only, now
    run(ns["wA"], "nft", "add table inet egressgw_agent")
    for chain, hook in (("into_tunnel", "postrouting"), ("from_tunnel", "input")):
        spec = f"{{ type filter hook {hook} priority filter; }}"
        run(ns["wA"], "nft", f"add chain inet egressgw_agent {chain} {spec}")
        run(ns["wA"], "nft", f"add rule inet egressgw_agent {chain} counter")
    fresh.agents["wA"].setup(WA)
    table = run(ns["wA"], "nft", "list", "table", "inet", "egressgw_agent")
    assert "into_tunnel" not in table and "from_tunnel" not in table
    assert "hook input" not in table and "hook forward" in table
    fresh.baseline()
    assert fresh.tcp_roundtrip("pA1", 4) == str(EGRESS["g1"][4])


# --- a tunnel between IPv6-only nodes --------------------------------------------------------


@dataclass
class SixNodes:
    ns: dict[str, str]
    agent: AgentDatapath | None = None
    tunnel: GatewayTunnel | None = None
    datapath: NftDatapath | None = None
    peers: list[str] = field(default_factory=list)
    listener: socket.socket | None = None

    def close(self) -> None:
        for part in (self.agent, self.tunnel, self.datapath, self.listener):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.close()
        for name in self.ns.values():
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


X_WORKER, X_GATEWAY = A("2001:db8:21::1"), A("2001:db8:21::2")
X_POD, X_FORGED = A("2001:db8:10:c::10"), A("2001:db8:10:c::99")
X_EGRESS, X_SERVER = A("2001:db8:31::10"), "2001:db8:31::100"


@pytest.fixture
def six() -> Iterator[SixNodes]:
    """worker (pod behind cni0) -- 2001:db8:21::/64 -- gateway -- 2001:db8:31::/64 -- server,
    with no IPv4 address anywhere."""
    require_kernel()
    tag = unique_name("eg6")
    nodes = SixNodes(ns={n: f"{tag}-{n}" for n in ("w", "g", "p", "ext")})
    ns = nodes.ns
    try:
        for name in ns.values():
            subprocess.run(["ip", "netns", "add", name], check=True)
            ip(name, "link", "set", "lo", "up")
            sysctl(name, "net.ipv6.conf.all.accept_dad", "0")
            sysctl(name, "net.ipv6.conf.default.accept_dad", "0")
            sysctl(name, "net.ipv6.conf.all.forwarding", "1")
        _veth(ns["w"], "eth0", ns["g"], "eth0")
        _addresses(ns["w"], "eth0", f"{X_WORKER}/64")
        _addresses(ns["g"], "eth0", f"{X_GATEWAY}/64")
        _veth(ns["g"], "up0", ns["ext"], "eth0")
        _addresses(ns["g"], "up0", "2001:db8:31::2/64")
        _addresses(ns["ext"], "eth0", f"{X_SERVER}/64")
        ip(ns["w"], "link", "add", "cni0", "type", "bridge")
        _addresses(ns["w"], "cni0", "2001:db8:10:c::1/64")
        _veth(ns["p"], "eth0", ns["w"], "veth0")
        ip(ns["w"], "link", "set", "veth0", "master", "cni0", "up")
        _addresses(ns["p"], "eth0", f"{X_POD}/64")
        ip(ns["p"], "-6", "route", "add", "default", "via", "2001:db8:10:c::1")
        ip(ns["p"], "-6", "addr", "add", f"{X_FORGED}/128", "dev", "eth0", "nodad")
        nodes.listener = tcp_listener(ns["ext"], X_SERVER, PORT, nodes.peers, _echo)
        nodes.datapath = NftDatapath("egressgw", "up0", netns=ns["g"])
        nodes.datapath.adopt()
        state = DesiredState(identities={PAYMENTS: "payments/gw"})
        state.workloads = {X_POD: PAYMENTS, X_FORGED: PAYMENTS}
        state.snat[6][PAYMENTS] = X_EGRESS
        state.egress_ips, state.default_allow = {X_EGRESS}, {PAYMENTS}
        nodes.datapath.reconcile(state)
        uplink = UplinkAddresses("up0", netns=ns["g"])
        uplink.sync({X_EGRESS}, set())
        uplink.close()
        nodes.tunnel = GatewayTunnel(TUNNEL, "egressgw", "up0", netns=ns["g"])
        nodes.tunnel.setup(X_GATEWAY)
        nodes.tunnel.apply(TunnelPeers("g", X_GATEWAY, {X_POD: X_WORKER}))
        cluster = [N("2001:db8:10::/48"), N("2001:db8:21::/64")]
        nodes.agent = AgentDatapath(TUNNEL, cluster, [], netns=ns["w"])
        nodes.agent.setup(X_WORKER)
    except BaseException:
        nodes.close()
        raise
    try:
        yield nodes
    finally:
        nodes.close()


def test_a_tunnel_between_ipv6_only_nodes_carries_ipv6_and_checks_the_inner_source(
    six: SixNodes,
) -> None:
    assert six.agent is not None
    hops = {("payments", 4): X_GATEWAY, ("payments", 6): X_GATEWAY}
    changes = six.agent.apply(
        AgentPlan("w", X_WORKER, {X_POD: "payments", X_FORGED: "payments"}, hops)
    )
    assert changes.notes == [f"gateway payments: no IPv4 next hop over holder {X_GATEWAY}"]

    def connect(source: IPAddress) -> None:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.bind((str(source), 0))
            sock.connect((X_SERVER, PORT))
            sock.sendall(b"six\n")
            assert sock.recv(8) == b"six\n"

    call_in(six.ns["p"], lambda: connect(X_POD))
    assert six.peers == [str(X_EGRESS)]
    drops = counted(six.ns["g"], "egressgw", "tunnel_check")
    with pytest.raises(OSError):  # steered by a lying worker, refused by the gateway
        call_in(six.ns["p"], lambda: connect(X_FORGED))
    assert six.peers == [str(X_EGRESS)]
    assert counted(six.ns["g"], "egressgw", "tunnel_check") > drops
    link = run(six.ns["w"], "ip", "-d", "link", "show", "egw0")
    assert f"local {X_WORKER}" in link and "mtu 1430" in link and mac_for(X_WORKER) in link
    listing = run(six.ns["g"], "nft", "list", "set", "inet", "egressgw", "tunnel6_pods6")
    assert f"{X_WORKER} . 0x20010db80010000c0000000000000010" in listing
