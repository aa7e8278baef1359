"""The lab's networks: namespaces, links, addresses, routes, the node router and the observers.

In: a lab's namespace names. Out: the cluster of ``topology`` wired up in network namespaces:

- the node network, a switch: a bridge (``nodes0``) in a namespace of its own with a port per
  node, one for the cluster DNS host and one for the router, so that a node reaches the router
  and another node alike, across the switch; every node routes each worker's pod CIDR to that
  worker and the Service CIDR to the cluster DNS host (host-gw style), and everything else to
  the router;
- on each worker, a pod bridge (``cbr0``) with its pods on it;
- the external network, a bridge (``ext0``) in the external namespace with the router's and the
  gateways' uplinks on it; its servers' addresses on its loopback, and no route back into the
  cluster, so only translated traffic gets an answer;
- the node router, which masquerades whatever the cluster sends out to its own address and counts
  it per pod (``routed_packets``), and the external network's counters of packets that arrive with
  a pod's own address (``leaked_packets``).

Nodes have forwarding on and loose reverse-path filtering (as systemd sets it on Debian); the two
switches do not pass bridged traffic to netfilter, the workers' pod bridges do (as Kubernetes nodes
are set up). ``unplug`` and ``plug`` take a node off its networks and put it back, the way a node
that fails drops off its switches. Every command runs inside a lab namespace (``ip -n`` or ``ip
netns exec``); links are created from inside one lab namespace with their peer placed directly
in another, never in the root namespace.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from egressgw.lab import netns
from egressgw.lab.topology import (
    ANYIP_PREFIX_V6,
    BRIDGE_IFNAME,
    CLUSTER_DNS_V4,
    CLUSTER_DNS_V6,
    CLUSTER_SUPERNET_V4,
    CLUSTER_SUPERNET_V6,
    DNS_BLACKHOLES,
    DNS_HOST_V4,
    DNS_HOST_V6,
    EXT_IFNAME,
    EXT_V4,
    EXT_V6,
    GATEWAYS,
    NODE_IFNAME,
    NODE_PREFIX_V4,
    NODE_PREFIX_V6,
    NODES,
    POD_IFNAME,
    POD_PREFIX_V4,
    POD_PREFIX_V6,
    PODS,
    ROUTER_NODE_V4,
    ROUTER_NODE_V6,
    ROUTER_V4,
    ROUTER_V6,
    SERVICE_ADDRESSES,
    SERVICE_CIDR_V4,
    SERVICE_CIDR_V6,
    SERVICE_IFNAME,
    SERVICE_PREFIX_V4,
    SERVICE_PREFIX_V6,
    SWITCH_IFNAME,
    UPLINK_IFNAME,
    UPLINK_PREFIX_V4,
    UPLINK_PREFIX_V6,
    WORKERS,
    Gateway,
    LabPod,
    NetnsNames,
    Worker,
    node_by_name,
    pods_on,
    worker_of,
)

OBSERVER_TABLE = "egressgw_lab_observe"  # in the external namespace
ROUTER_TABLE = "egressgw_lab_router"  # in the router's namespace
DNS_HOST_PORT = "n-dns"  # the cluster DNS host's port on the node network's switch
ROUTER_NODE_PORT = "n-router"  # the router's port on the node network's switch
ROUTER_EXT_PORT = "x-router"  # the router's port on the external network's bridge

# DAD is off everywhere so IPv6 addresses are usable at once.
_NO_DAD = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv6.conf.all.accept_ra": "0",
    "net.ipv6.conf.default.accept_ra": "0",
}
_ROUTING = {
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
    "net.ipv4.conf.all.rp_filter": "2",
    "net.ipv4.conf.default.rp_filter": "2",
}
_BRIDGE_NETFILTER = (
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.bridge.bridge-nf-call-arptables",
)
_SWITCH = {key: "0" for key in _BRIDGE_NETFILTER}
_POD_BRIDGE = {key: "1" for key in _BRIDGE_NETFILTER}
_BRIDGE = "type bridge forward_delay 0 stp_state 0 mcast_snooping 0"


def _addr(address: str, prefix: int, dev: str) -> str:
    return f"addr add {address}/{prefix} dev {dev}" + (" nodad" if ":" in address else "")


def build(names: NetnsNames, created: Callable[[str], None]) -> None:
    """Build every namespace, link, address and route of the lab; ``created`` hears of each
    namespace as soon as it exists (so a failure half-way can be cleaned up)."""
    for ns in names.all():
        netns.add(ns)
        created(ns)
    _sysctls(names)
    _links(names)
    _infrastructure(names)
    for worker in WORKERS:
        _worker(names, worker)
    for gateway in GATEWAYS:
        _gateway(names, gateway)
    for pod in PODS:
        _pod(names, pod)
    _install_router(names)
    _install_observer(names)


def _sysctls(names: NetnsNames) -> None:
    for ns in names.all():
        settings = dict(_NO_DAD)
        if ns in (*names.nodes, names.router):
            settings |= _ROUTING
        if ns in (names.switch, names.ext):
            settings |= _SWITCH
        if ns in (names.node(worker.name) for worker in WORKERS):
            settings |= _POD_BRIDGE
        netns.sysctl(ns, settings)


def _links(names: NetnsNames) -> None:
    """Veth pairs, each created inside a lab namespace with its peer placed in another one."""
    switch: list[str] = [f"link add {SWITCH_IFNAME} {_BRIDGE}"]
    for node in NODES:
        switch.append(
            f"link add {node.switch_port} type veth peer name {NODE_IFNAME}"
            f" netns {names.node(node.name)}"
        )
    switch.append(f"link add {DNS_HOST_PORT} type veth peer name {NODE_IFNAME} netns {names.dns}")
    switch.append(
        f"link add {ROUTER_NODE_PORT} type veth peer name {NODE_IFNAME} netns {names.router}"
    )
    for port in (*(node.switch_port for node in NODES), DNS_HOST_PORT, ROUTER_NODE_PORT):
        switch.append(f"link set {port} master {SWITCH_IFNAME} up")
    switch.append(f"link set {SWITCH_IFNAME} up")
    netns.ip_batch(names.switch, switch)
    netns.ip_batch(
        names.router,
        [f"link add {UPLINK_IFNAME} type veth peer name {ROUTER_EXT_PORT} netns {names.ext}"],
    )

    ext: list[str] = [f"link add {EXT_IFNAME} {_BRIDGE}"]
    for gateway in GATEWAYS:
        ext.append(
            f"link add {gateway.ext_port} type veth peer name {UPLINK_IFNAME}"
            f" netns {names.node(gateway.name)}"
        )
    for port in (*(gateway.ext_port for gateway in GATEWAYS), ROUTER_EXT_PORT):
        ext.append(f"link set {port} master {EXT_IFNAME} up")
    ext.append(f"link set {EXT_IFNAME} up")
    netns.ip_batch(names.ext, ext)

    for pod in PODS:
        netns.ip_batch(
            names.pod(pod),
            [
                f"link add {POD_IFNAME} type veth peer name {pod.node_ifname}"
                f" netns {names.node(pod.node)}"
            ],
        )


def _pod_routes_via_workers(skip: str = "") -> list[str]:
    """Host-gw routes: each worker's pod CIDRs via that worker's node address."""
    routes: list[str] = []
    for worker in WORKERS:
        if worker.name != skip:
            routes.append(f"route add {worker.pod_cidr_v4} via {worker.ipv4}")
            routes.append(f"route add {worker.pod_cidr_v6} via {worker.ipv6}")
    return routes


_SERVICE_ROUTES = [
    f"route add {SERVICE_CIDR_V4} via {DNS_HOST_V4}",
    f"route add {SERVICE_CIDR_V6} via {DNS_HOST_V6}",
]


def _infrastructure(names: NetnsNames) -> None:
    netns.ip_batch(
        names.router,
        [
            _addr(ROUTER_NODE_V4, NODE_PREFIX_V4, NODE_IFNAME),
            _addr(ROUTER_NODE_V6, NODE_PREFIX_V6, NODE_IFNAME),
            f"link set {NODE_IFNAME} up",
            _addr(ROUTER_V4, UPLINK_PREFIX_V4, UPLINK_IFNAME),
            _addr(ROUTER_V6, UPLINK_PREFIX_V6, UPLINK_IFNAME),
            f"link set {UPLINK_IFNAME} up",
            f"route add default via {EXT_V4} dev {UPLINK_IFNAME}",
            f"route add default via {EXT_V6} dev {UPLINK_IFNAME}",
            *_pod_routes_via_workers(),
            *_SERVICE_ROUTES,
        ],
    )
    netns.ip_batch(
        names.dns,
        [
            _addr(DNS_HOST_V4, NODE_PREFIX_V4, NODE_IFNAME),
            _addr(DNS_HOST_V6, NODE_PREFIX_V6, NODE_IFNAME),
            f"link set {NODE_IFNAME} up",
            # The kube-dns Service addresses: the cluster routes the Service CIDR here.
            _addr(CLUSTER_DNS_V4, 32, "lo"),
            _addr(CLUSTER_DNS_V6, 128, "lo"),
            f"route add default via {ROUTER_NODE_V4}",
            f"route add default via {ROUTER_NODE_V6}",
            *_pod_routes_via_workers(),
        ],
    )
    netns.ip_batch(
        names.ext,
        [
            *(
                _addr(a, SERVICE_PREFIX_V6 if ":" in a else SERVICE_PREFIX_V4, SERVICE_IFNAME)
                for a in SERVICE_ADDRESSES
            ),
            # AnyIP: every address of this prefix is local, so each accepts connections.
            f"route add local {ANYIP_PREFIX_V6} dev {SERVICE_IFNAME}",
            _addr(EXT_V4, UPLINK_PREFIX_V4, EXT_IFNAME),
            _addr(EXT_V6, UPLINK_PREFIX_V6, EXT_IFNAME),
            # No route back into the cluster: traffic that escapes without SNAT gets no reply.
        ],
    )


def _worker(names: NetnsNames, worker: Worker) -> None:
    netns.ip_batch(
        names.node(worker.name),
        [
            _addr(worker.ipv4, NODE_PREFIX_V4, NODE_IFNAME),
            _addr(worker.ipv6, NODE_PREFIX_V6, NODE_IFNAME),
            f"link set {NODE_IFNAME} up",
            f"link add {BRIDGE_IFNAME} {_BRIDGE}",
            _addr(worker.bridge_v4, POD_PREFIX_V4, BRIDGE_IFNAME),
            _addr(worker.bridge_v6, POD_PREFIX_V6, BRIDGE_IFNAME),
            f"link set {BRIDGE_IFNAME} up",
            *(
                f"link set {pod.node_ifname} master {BRIDGE_IFNAME} up"
                for pod in pods_on(worker.name)
            ),
            f"route add default via {ROUTER_NODE_V4}",
            f"route add default via {ROUTER_NODE_V6}",
            *_pod_routes_via_workers(skip=worker.name),
            *_SERVICE_ROUTES,
        ],
    )


def _gateway(names: NetnsNames, gateway: Gateway) -> None:
    netns.ip_batch(
        names.node(gateway.name),
        [
            _addr(gateway.ipv4, NODE_PREFIX_V4, NODE_IFNAME),
            _addr(gateway.ipv6, NODE_PREFIX_V6, NODE_IFNAME),
            f"link set {NODE_IFNAME} up",
            # Egress IPs are added here by egressgw, not by the lab.
            _addr(gateway.uplink_v4, UPLINK_PREFIX_V4, UPLINK_IFNAME),
            _addr(gateway.uplink_v6, UPLINK_PREFIX_V6, UPLINK_IFNAME),
            f"link set {UPLINK_IFNAME} up",
            f"route add default via {EXT_V4} dev {UPLINK_IFNAME}",
            f"route add default via {EXT_V6} dev {UPLINK_IFNAME}",
            *_pod_routes_via_workers(),
            *_SERVICE_ROUTES,
        ],
    )


def _pod(names: NetnsNames, pod: LabPod) -> None:
    worker = worker_of(pod)
    netns.ip_batch(
        names.pod(pod),
        [
            _addr(pod.ipv4, POD_PREFIX_V4, POD_IFNAME),
            _addr(pod.ipv6, POD_PREFIX_V6, POD_IFNAME),
            f"link set {POD_IFNAME} up",
            f"route add default via {worker.bridge_v4} dev {POD_IFNAME}",
            f"route add default via {worker.bridge_v6} dev {POD_IFNAME}",
        ],
    )


def routed_counter(pod: LabPod, family: int) -> str:
    return f"routed-{pod.name}-v{family}"


def leak_counter(pod: LabPod, family: int) -> str:
    return f"leak-{pod.name}-v{family}"


def _counters(names: list[str]) -> list[str]:
    return [line for name in names for line in (f"  counter {name} {{", "  }")]


def _install_router(names: NetnsNames) -> None:
    """Masquerade what the cluster sends out (ordinary node egress), counted per pod: one
    lookup per packet, so counting costs the router path what a single rule does."""
    lines = [f"table inet {ROUTER_TABLE} {{"]
    lines += _counters([routed_counter(pod, f) for pod in PODS for f in (4, 6)])
    for family, kind in ((4, "ipv4_addr"), (6, "ipv6_addr")):
        entries = ", ".join(
            f'{pod.ipv4 if family == 4 else pod.ipv6} : "{routed_counter(pod, family)}"'
            for pod in PODS
        )
        lines += [
            f"  map routed{family} {{",
            f"    type {kind} : counter",
            f"    elements = {{ {entries} }}",
            "  }",
        ]
    lines.append("  chain count {")
    lines.append("    type filter hook forward priority filter; policy accept;")
    lines.append(f'    oifname "{UPLINK_IFNAME}" counter name ip saddr map @routed4')
    lines.append(f'    oifname "{UPLINK_IFNAME}" counter name ip6 saddr map @routed6')
    lines.append("  }")
    lines.append("  chain node_egress {")
    lines.append("    type nat hook postrouting priority srcnat; policy accept;")
    lines.append(f'    oifname "{UPLINK_IFNAME}" ip saddr {CLUSTER_SUPERNET_V4} masquerade')
    lines.append(f'    oifname "{UPLINK_IFNAME}" ip6 saddr {CLUSTER_SUPERNET_V6} masquerade')
    lines.append("  }")
    lines.append("}")
    _nft(names.router, lines)


def _install_observer(names: NetnsNames) -> None:
    """Counters in the external namespace for packets that arrive with a pod's own address,
    and the filter that makes the blackhole DNS addresses swallow everything sent to them.

    The router and the gateways replace every pod address on the way out, so any such packet
    escaped both: ``leaked_packets`` reads these counters.
    """
    lines = [f"table inet {OBSERVER_TABLE} {{"]
    lines += _counters([leak_counter(pod, f) for pod in PODS for f in (4, 6)])
    lines.append("  chain observe {")
    lines.append("    type filter hook prerouting priority raw; policy accept;")
    for pod in PODS:
        lines.append(f'    ip saddr {pod.ipv4} counter name "{leak_counter(pod, 4)}"')
        lines.append(f'    ip6 saddr {pod.ipv6} counter name "{leak_counter(pod, 6)}"')
    lines.append("  }")
    lines.append("  chain blackhole {")
    lines.append("    type filter hook input priority filter; policy accept;")
    for address in DNS_BLACKHOLES:
        lines.append(f"    {'ip6' if ':' in address else 'ip'} daddr {address} drop")
    lines.append("  }")
    lines.append("}")
    _nft(names.ext, lines)


def _nft(ns: str, lines: list[str]) -> None:
    netns.run(netns.exec_argv(ns, ["nft", "-f", "-"]), input_text="\n".join(lines) + "\n")


def read_counters(ns: str, table: str) -> dict[str, int]:
    """Packets per named counter of ``table`` (inet) in ``ns``."""
    proc = netns.run(netns.exec_argv(ns, ["nft", "-j", "list", "counters", "table", "inet", table]))
    by_name: dict[str, int] = {}
    for item in json.loads(proc.stdout).get("nftables", []):
        counter = item.get("counter")
        if counter:
            by_name[str(counter["name"])] = int(counter["packets"])
    return by_name


@contextmanager
def counting(
    ns: str, matches: Sequence[str], table: str, then: str = ""
) -> Iterator[Callable[[], list[int]]]:
    """Count, in ``ns``, the packets that match each nftables expression of ``matches`` (at
    prerouting, before anything else sees them) until the block ends; yields a function that
    reads the counts, in the order of ``matches``. ``then`` (e.g. ``drop``) is what becomes of a
    packet counted. The table ``table`` (inet) is removed after."""
    names = [f"c{index}" for index in range(len(matches))]
    lines = [f"table inet {table} {{", *_counters(names), "  chain count {"]
    lines.append("    type filter hook prerouting priority raw - 1; policy accept;")
    lines += [
        f'    {match} counter name "{name}" {then}'.rstrip()
        for match, name in zip(matches, names, strict=True)
    ]
    lines += ["  }", "}"]
    _nft(ns, lines)
    try:
        yield lambda: [read_counters(ns, table).get(name, 0) for name in names]
    finally:
        netns.run(netns.exec_argv(ns, ["nft", "delete", "table", "inet", table]), check=False)


def _ports(node_name: str) -> list[tuple[str, str]]:
    """(namespace role, port) pairs that connect a node to its switches."""
    node = node_by_name(node_name)
    ports = [("switch", node.switch_port)]
    if isinstance(node, Gateway):
        ports.append(("ext", node.ext_port))
    return ports


def _set_ports(names: NetnsNames, node_name: str, state: str) -> None:
    where = {"switch": names.switch, "ext": names.ext}
    for role, port in _ports(node_name):
        netns.run(["ip", "-n", where[role], "link", "set", port, state])


def unplug(names: NetnsNames, node_name: str) -> None:
    """Take a node off the node network (and a gateway off the external network): its switch
    ports go down, so nothing reaches it and nothing leaves it. Its own state is kept."""
    _set_ports(names, node_name, "down")


def plug(names: NetnsNames, node_name: str) -> None:
    """Undo ``unplug``."""
    _set_ports(names, node_name, "up")


def unplugged(names: NetnsNames, node_name: str) -> bool:
    """Whether any of the node's switch ports is down."""
    where = {"switch": names.switch, "ext": names.ext}
    for role, port in _ports(node_name):
        proc = netns.run(["ip", "-n", where[role], "-j", "link", "show", port], check=False)
        try:
            flags = json.loads(proc.stdout)[0].get("flags", [])
        except (ValueError, IndexError):
            return True
        if "UP" not in flags:
            return True
    return False
