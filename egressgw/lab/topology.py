"""The lab's fixed shape: nodes, pods, the networks between them and every address, as plain data.

The lab is a small cluster. Two worker nodes carry the pods (a bridge per node, host-gw routes
between nodes); two gateway nodes each hold one project's egress IPs (their Node labels match that
project's EgressGateway nodeSelector) and have an uplink to the external network; a cluster DNS
answers ``cluster.local`` and forwards the rest; a node router switches the node network and
masquerades ordinary node egress to the external network, so anything that leaves that way shows
the router's address. The external network holds PostgreSQL, the HTTP echo server and DNS.

IPv4 (cluster inside 192.0.2.0/24, outside in 198.51.100.0/24 and 203.0.113.0/24)::

    pods       192.0.2.0/25     worker-1 192.0.2.0/26 (bridge .1), worker-2 192.0.2.64/26 (.65)
    services   192.0.2.128/26   cluster DNS 192.0.2.153, kubernetes 192.0.2.129
    nodes      192.0.2.192/26   router .193, worker-1 .201, worker-2 .202, gateway-1 .211,
                                gateway-2 .212, cluster DNS host .253
    uplinks    198.51.100.0/24  external .1, gateway-1 .2, gateway-2 .3, router .100,
                                egress IPs .10 (payments) and .20 (analytics)
    servers    203.0.113.0/24   PostgreSQL .10, web .20-.23, blocked .30, DNS .53-.55

IPv6 mirrors it: pods 2001:db8:1:1::/64 and 2001:db8:1:2::/64, services 2001:db8:1:100::/112
(cluster DNS ::53), nodes 2001:db8:1:200::/64 (host part as the IPv4 one), uplinks
2001:db8:100::/64, servers 2001:db8:203::/64 and 2001:db8:203:1::/64.

The example policies and the end-to-end tests rely on these exact values, so they live in one
place. Nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

DEFAULT_LAB_NAME = "egl"
STATE_ROOT = "/run/egressgw-lab"

# Lab names become prefixes of network namespace names; keep them short and unambiguous.
_LAB_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
MAX_LAB_NAME_LENGTH = 24


def check_lab_name(name: str) -> str:
    """Return ``name`` if it can prefix the lab's namespace names, else raise ValueError."""
    if len(name) > MAX_LAB_NAME_LENGTH or not _LAB_NAME_RE.match(name):
        raise ValueError(
            f"lab name {name!r} must be lower-case letters, digits and single dashes, start"
            f" with a letter and be at most {MAX_LAB_NAME_LENGTH} characters"
            " (e.g. 'egl' or 'egt-1a2b3c4d')"
        )
    return name


def family_of(address: str) -> int:
    """4 or 6."""
    return 6 if ":" in address else 4


# --- the networks ------------------------------------------------------------------------------

POD_CIDR_V4 = "192.0.2.0/25"
POD_CIDR_V6 = "2001:db8:1::/56"
SERVICE_CIDR_V4 = "192.0.2.128/26"
SERVICE_CIDR_V6 = "2001:db8:1:100::/112"
NODE_CIDR_V4 = "192.0.2.192/26"
NODE_CIDR_V6 = "2001:db8:1:200::/64"
NODE_PREFIX_V4 = 26
NODE_PREFIX_V6 = 64
# What the agents leave untouched: pod, service and node networks, both families.
CLUSTER_CIDRS: tuple[str, ...] = (
    POD_CIDR_V4,
    SERVICE_CIDR_V4,
    NODE_CIDR_V4,
    POD_CIDR_V6,
    SERVICE_CIDR_V6,
    NODE_CIDR_V6,
)
# Everything the router masquerades when it leaves for the external network.
CLUSTER_SUPERNET_V4 = "192.0.2.0/24"
CLUSTER_SUPERNET_V6 = "2001:db8:1::/48"

# The node network: a bridge in a namespace of its own (the switch); the router is a host on it.
NODE_IFNAME = "eth0"  # every node's (and the cluster DNS host's) link to the node network
SWITCH_IFNAME = "nodes0"  # the bridge, in the switch's namespace
ROUTER_NODE_V4 = "192.0.2.193"
ROUTER_NODE_V6 = "2001:db8:1:200::193"

# The external network: a bridge in the external namespace connects the router and the gateways.
UPLINK_IFNAME = "up0"  # a gateway's (and the router's) link to the external network
EXT_IFNAME = "ext0"  # the bridge, in the external namespace
EXT_V4 = "198.51.100.1"
EXT_V6 = "2001:db8:100::1"
UPLINK_PREFIX_V4 = 24
UPLINK_PREFIX_V6 = 64
# The router's address on the external network: ordinary node egress is masqueraded to it, so a
# selected pod's traffic seen from here has escaped its gateway.
ROUTER_V4 = "198.51.100.100"
ROUTER_V6 = "2001:db8:100::100"

POD_IFNAME = "eth0"
BRIDGE_IFNAME = "cbr0"  # a worker's pod bridge


@dataclass(frozen=True)
class LabNamespace:
    """A Kubernetes namespace of the lab (not a network namespace)."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Worker:
    """A worker node: its pods hang on ``cbr0``; ``egressgw agent`` runs here."""

    name: str
    ipv4: str  # node network (its InternalIPs)
    ipv6: str
    pod_cidr_v4: str
    pod_cidr_v6: str
    bridge_v4: str  # the pods' default gateway
    bridge_v6: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def switch_port(self) -> str:
        """Its port on the node network's switch (in the switch's namespace)."""
        return f"n-{self.name}"


@dataclass(frozen=True)
class Gateway:
    """A gateway node: ``egressgw run --node-name`` holds the egress IPs its labels select."""

    name: str
    ipv4: str  # node network (its InternalIPs)
    ipv6: str
    uplink_v4: str  # its own address on the external network
    uplink_v6: str
    project: str  # whose EgressGateway's nodeSelector matches it
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def switch_port(self) -> str:
        return f"n-{self.name}"

    @property
    def ext_port(self) -> str:
        """Its port on the external network's bridge (in the external namespace)."""
        return f"x-{self.name}"


Node = Worker | Gateway


@dataclass(frozen=True)
class LabPod:
    """A workload: one network namespace whose ``eth0`` hangs on its worker's pod bridge."""

    namespace: str
    name: str
    labels: dict[str, str]
    ipv4: str
    ipv6: str
    node: str  # the worker it runs on (spec.nodeName)

    @property
    def key(self) -> str:
        """``namespace/name``, how the demo table and the tests name a pod."""
        return f"{self.namespace}/{self.name}"

    @property
    def project(self) -> str:
        return self.namespace

    @property
    def node_ifname(self) -> str:
        """The veth peer's name in its worker's namespace (at most 15 characters)."""
        return f"v-{self.name}"

    @property
    def dns_name(self) -> str:
        """Its name in the cluster DNS, as a StatefulSet pod behind a headless Service."""
        return f"{self.name}.{self.service}.{self.namespace}.svc.{CLUSTER_DOMAIN}"

    @property
    def service(self) -> str:
        """The headless Service of its app: ``<app>.<namespace>.svc.cluster.local``."""
        return self.labels["app"]

    def address(self, family: int) -> str:
        return self.ipv4 if family == 4 else self.ipv6


NAMESPACES: tuple[LabNamespace, ...] = (
    LabNamespace("payments", {"project": "payments"}),
    LabNamespace("analytics", {"project": "analytics"}),
    LabNamespace("sandbox", {}),
)

GATEWAY_LABEL = "egressgw.io/gateway"  # where `egressgw run` runs
EGRESS_GROUP_LABEL = "egressgw.io/egress-group"  # which EgressGateway's IPs a node may hold

WORKERS: tuple[Worker, ...] = (
    Worker(
        "worker-1",
        "192.0.2.201",
        "2001:db8:1:200::201",
        "192.0.2.0/26",
        "2001:db8:1:1::/64",
        "192.0.2.1",
        "2001:db8:1:1::1",
        {"kubernetes.io/hostname": "worker-1"},
    ),
    Worker(
        "worker-2",
        "192.0.2.202",
        "2001:db8:1:200::202",
        "192.0.2.64/26",
        "2001:db8:1:2::/64",
        "192.0.2.65",
        "2001:db8:1:2::1",
        {"kubernetes.io/hostname": "worker-2"},
    ),
)
GATEWAYS: tuple[Gateway, ...] = (
    Gateway(
        "gateway-1",
        "192.0.2.211",
        "2001:db8:1:200::211",
        "198.51.100.2",
        "2001:db8:100::2",
        "payments",
        {
            "kubernetes.io/hostname": "gateway-1",
            GATEWAY_LABEL: "true",
            EGRESS_GROUP_LABEL: "payments",
        },
    ),
    Gateway(
        "gateway-2",
        "192.0.2.212",
        "2001:db8:1:200::212",
        "198.51.100.3",
        "2001:db8:100::3",
        "analytics",
        {
            "kubernetes.io/hostname": "gateway-2",
            GATEWAY_LABEL: "true",
            EGRESS_GROUP_LABEL: "analytics",
        },
    ),
)
NODES: tuple[Node, ...] = (*WORKERS, *GATEWAYS)
POD_PREFIX_V4 = 26
POD_PREFIX_V6 = 64

PODS: tuple[LabPod, ...] = (
    LabPod("payments", "api-0", {"app": "api"}, "192.0.2.10", "2001:db8:1:1::10", "worker-1"),
    LabPod("analytics", "etl-0", {"app": "etl"}, "192.0.2.20", "2001:db8:1:1::20", "worker-1"),
    LabPod("sandbox", "shell-0", {"app": "shell"}, "192.0.2.30", "2001:db8:1:1::30", "worker-1"),
    LabPod("payments", "api-1", {"app": "api"}, "192.0.2.70", "2001:db8:1:2::70", "worker-2"),
    LabPod("analytics", "etl-1", {"app": "etl"}, "192.0.2.80", "2001:db8:1:2::80", "worker-2"),
    LabPod("sandbox", "shell-1", {"app": "shell"}, "192.0.2.90", "2001:db8:1:2::90", "worker-2"),
)
PODS_BY_KEY: dict[str, LabPod] = {pod.key: pod for pod in PODS}
# The unselected pods serve HTTP to other pods (the echo server, on this port): pod-to-pod traffic.
POD_HTTP_PORT = 80
ECHO_PODS: tuple[LabPod, ...] = tuple(pod for pod in PODS if pod.namespace == "sandbox")

# The gateway node that holds payments' egress IPs: where most tests look at "the gateway".
PAYMENTS_GATEWAY = "gateway-1"
ANALYTICS_GATEWAY = "gateway-2"


def pod_by_key(key: str) -> LabPod:
    """The pod named ``namespace/name`` (or just ``name``); ValueError if the lab has none."""
    if key in PODS_BY_KEY:
        return PODS_BY_KEY[key]
    for pod in PODS:
        if pod.name == key:
            return pod
    raise ValueError(f"no pod {key!r} in the lab (pods: {', '.join(PODS_BY_KEY)})")


def node_by_name(name: str) -> Node:
    for node in NODES:
        if node.name == name:
            return node
    raise ValueError(f"no node {name!r} in the lab (nodes: {', '.join(n.name for n in NODES)})")


def worker_of(pod: LabPod) -> Worker:
    for worker in WORKERS:
        if worker.name == pod.node:
            return worker
    raise ValueError(f"pod {pod.key} runs on {pod.node!r}, which is no worker of the lab")


def pods_on(worker: str) -> tuple[LabPod, ...]:
    return tuple(pod for pod in PODS if pod.node == worker)


def gateway_of(project: str) -> Gateway:
    """The gateway node whose labels select ``project``'s egress IPs."""
    for gateway in GATEWAYS:
        if gateway.project == project:
            return gateway
    raise ValueError(f"no gateway node holds the egress IPs of {project!r}")


# --- the cluster DNS ---------------------------------------------------------------------------

CLUSTER_DOMAIN = "cluster.local"
CLUSTER_DNS_V4 = "192.0.2.153"  # the kube-dns Service address the pods' resolv.conf names
CLUSTER_DNS_V6 = "2001:db8:1:100::53"
DNS_HOST_V4 = "192.0.2.253"  # the host the Service addresses route to (its node network address)
DNS_HOST_V6 = "2001:db8:1:200::253"
KUBERNETES_SERVICE_V4 = "192.0.2.129"
KUBERNETES_SERVICE_V6 = "2001:db8:1:100::1"
CLUSTER_DNS_TTL_SECONDS = 30  # CoreDNS's default for cluster names


def search_list(namespace: str) -> tuple[str, ...]:
    """The resolv.conf search list Kubernetes gives a pod of ``namespace``."""
    return (f"{namespace}.svc.{CLUSTER_DOMAIN}", f"svc.{CLUSTER_DOMAIN}", CLUSTER_DOMAIN)


def pod_resolv_conf(pod: LabPod) -> str:
    """A Kubernetes-style resolv.conf: the cluster DNS, the search list and ndots:5 (short
    timeouts, so a name that cannot be resolved fails in seconds)."""
    return (
        f"search {' '.join(search_list(pod.namespace))}\n"
        f"nameserver {CLUSTER_DNS_V4}\nnameserver {CLUSTER_DNS_V6}\n"
        "options ndots:5 timeout:1 attempts:1\n"
    )


def cluster_hosts_lines() -> list[str]:
    """The cluster DNS's records, hosts-file style: Services, and each pod by its StatefulSet
    name and under its headless Service (several lines for one name add up)."""
    lines = [
        f"{KUBERNETES_SERVICE_V4} kubernetes.default.svc.{CLUSTER_DOMAIN}",
        f"{KUBERNETES_SERVICE_V6} kubernetes.default.svc.{CLUSTER_DOMAIN}",
        f"{CLUSTER_DNS_V4} kube-dns.kube-system.svc.{CLUSTER_DOMAIN}",
        f"{CLUSTER_DNS_V6} kube-dns.kube-system.svc.{CLUSTER_DOMAIN}",
    ]
    for pod in PODS:
        headless = f"{pod.service}.{pod.namespace}.svc.{CLUSTER_DOMAIN}"
        for address in (pod.ipv4, pod.ipv6):
            lines.append(f"{address} {pod.dns_name} {headless}")
    return lines


# --- the external network ----------------------------------------------------------------------

EGRESS_IPS: dict[str, tuple[str, str]] = {
    "payments": ("198.51.100.10", "2001:db8:100::10"),
    "analytics": ("198.51.100.20", "2001:db8:100::20"),
}

# Services in the external network, on its loopback (the kernel here has no dummy links).
SERVICE_IFNAME = "lo"
SERVICE_PREFIX_V4 = 24
SERVICE_PREFIX_V6 = 64
DB_V4 = "203.0.113.10"
DB_V6 = "2001:db8:203::10"
WEB_V4 = "203.0.113.20"
WEB_V6 = "2001:db8:203::20"
CDN_V4 = "203.0.113.21"  # www.cdn.lab.example, allowed by a wildcard
CDN_V6 = "2001:db8:203::21"
ORIGIN_V4 = "203.0.113.22"  # origin.lab.example, reached only through the alias CNAME
ORIGIN_V6 = "2001:db8:203::22"
SHORT_V4 = "203.0.113.23"  # short.lab.example, a record with a short TTL (expiry tests)
SHORT_V6 = "2001:db8:203::23"
BLOCKED_V4 = "203.0.113.30"  # blocked.lab.example, a name no policy allows
BLOCKED_V6 = "2001:db8:203::30"
DNS_V4 = "203.0.113.53"
DNS_V6 = "2001:db8:203::53"
# Upstreams that fail, for the failover tests. "Dead" addresses exist in the external network but
# nothing listens on port 53, so a query gets ICMP port unreachable at once; "blackhole"
# addresses exist too, and a filter in the external network drops whatever is sent to them, so a
# query is never answered at all.
DNS_DEAD_V4 = "203.0.113.54"
DNS_DEAD_V6 = "2001:db8:203::54"
DNS_BLACKHOLE_V4 = "203.0.113.55"
DNS_BLACKHOLE_V6 = "2001:db8:203::55"
# Addresses the HTTP echo server answers on, ports 80 and 8080.
WEB_ADDRESSES: tuple[str, ...] = (
    WEB_V4,
    CDN_V4,
    ORIGIN_V4,
    BLOCKED_V4,
    WEB_V6,
    CDN_V6,
    ORIGIN_V6,
    BLOCKED_V6,
)
SERVICE_ADDRESSES: tuple[str, ...] = (
    DB_V4,
    *(a for a in WEB_ADDRESSES if ":" not in a),
    SHORT_V4,
    DNS_V4,
    DNS_DEAD_V4,
    DNS_BLACKHOLE_V4,
    DB_V6,
    *(a for a in WEB_ADDRESSES if ":" in a),
    SHORT_V6,
    DNS_V6,
    DNS_DEAD_V6,
    DNS_BLACKHOLE_V6,
)
DNS_BLACKHOLES: tuple[str, ...] = (DNS_BLACKHOLE_V4, DNS_BLACKHOLE_V6)

POSTGRES_PORT = 5432
POSTGRES_DATABASE = "orders"
POSTGRES_USER = "postgres"
# Only the payments project's egress IPs may connect over the network.
POSTGRES_ALLOWED_SOURCES: tuple[str, ...] = ("198.51.100.10/32", "2001:db8:100::10/128")
HTTP_PORTS: tuple[int, ...] = (80, 8080)
# The echo server also listens on every address of the external network on this port (IPv4 and
# IPv6 wildcards), so every address of ``ANYIP_PREFIX_V6`` and the short-TTL name accept.
TEST_PORT = 9000
DNS_PORT = 53
# TTL of the lab DNS server's records (dnsmasq's own default, 0, would make every answer expire
# at once).
DNS_TTL_SECONDS = 60
SHORT_TTL_SECONDS = 2

DNS_DOMAIN = "lab.example"
DNS_HOST_RECORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("db.lab.example", (DB_V4, DB_V6)),
    ("web.lab.example", (WEB_V4, WEB_V6)),
    ("www.cdn.lab.example", (CDN_V4, CDN_V6)),
    ("origin.lab.example", (ORIGIN_V4, ORIGIN_V6)),
    ("blocked.lab.example", (BLOCKED_V4, BLOCKED_V6)),
)
# A CNAME to a name no policy mentions: the interceptor must follow the chain.
DNS_CNAMES: tuple[tuple[str, str], ...] = (("alias.lab.example", "origin.lab.example"),)
SHORT_NAME = "short.lab.example"
DNS_SHORT_RECORDS: tuple[tuple[str, tuple[str, ...], int], ...] = (
    (SHORT_NAME, (SHORT_V4, SHORT_V6), SHORT_TTL_SECONDS),
)

# A /64 that the external network accepts every address of (AnyIP: a local route on its
# loopback), so a name per address can be resolved and connected to, thousands of times.
ANYIP_PREFIX_V6 = "2001:db8:203:1::/64"
# rN.race.lab.example -> its own address, for N in range(RACE_NAME_COUNT). The resolve-then-
# connect test uses the first RACE_LOOP_COUNT names; other tests take fresh ones from the rest.
RACE_DOMAIN = "race.lab.example"
RACE_NAME_COUNT = 2200
RACE_LOOP_COUNT = 2000
# One name with MANY_ADDRESS_COUNT AAAA records, far over the interceptor's per-name cap.
MANY_NAME = "many.lab.example"
MANY_ADDRESS_COUNT = 500


def race_name(index: int) -> str:
    """The index-th name of the race zone: ``r<index>.race.lab.example``."""
    return f"r{index}.{RACE_DOMAIN}"


def race_address(index: int) -> str:
    """The address ``race_name(index)`` resolves to (AAAA only), inside ``ANYIP_PREFIX_V6``."""
    return str(ipaddress.IPv6Address("2001:db8:203:1::1:0") + index)


def many_addresses() -> tuple[str, ...]:
    """The AAAA records of ``MANY_NAME``, inside ``ANYIP_PREFIX_V6`` (all of them accept)."""
    base = ipaddress.IPv6Address("2001:db8:203:1::2:0")
    return tuple(str(base + i) for i in range(MANY_ADDRESS_COUNT))


def addn_hosts_lines() -> list[str]:
    """The lab DNS server's extra hosts file: the race names and the many-address name."""
    lines = [f"{race_address(i)} {race_name(i)}" for i in range(RACE_NAME_COUNT)]
    lines += [f"{address} {MANY_NAME}" for address in many_addresses()]
    return lines


# Every egressgw process listens here, inside its own node's namespace.
DAEMON_HTTP_LISTEN = "127.0.0.1:9460"


# --- network namespace names -------------------------------------------------------------------


@dataclass(frozen=True)
class NetnsNames:
    """The network namespace names of one lab, all prefixed by the lab name."""

    lab: str

    def node(self, name: str) -> str:
        """A worker's or gateway's namespace: ``<lab>-<node name>``."""
        return f"{self.lab}-{name}"

    @property
    def router(self) -> str:
        return f"{self.lab}-router"

    @property
    def switch(self) -> str:
        """The node network's switch: a bridge with a port per node, the router's included."""
        return f"{self.lab}-switch"

    @property
    def dns(self) -> str:
        """The cluster DNS host."""
        return f"{self.lab}-dns"

    @property
    def ext(self) -> str:
        return f"{self.lab}-ext"

    def pod(self, pod: LabPod) -> str:
        return f"{self.lab}-{pod.name}"

    @property
    def nodes(self) -> tuple[str, ...]:
        """The Kubernetes nodes' namespaces: workers, then gateways."""
        return tuple(self.node(node.name) for node in NODES)

    @property
    def infrastructure(self) -> tuple[str, str, str, str]:
        """The namespaces that are no node and no pod: the node network's switch, router,
        cluster DNS, external network."""
        return (self.switch, self.router, self.dns, self.ext)

    def all(self) -> tuple[str, ...]:
        """Every namespace of the lab, in creation order (removal goes in reverse)."""
        return (*self.infrastructure, *self.nodes, *(self.pod(pod) for pod in PODS))

    def owns(self, ns: str) -> bool:
        """Whether ``ns`` carries this lab's prefix (a namespace this lab may have created)."""
        return ns.startswith(f"{self.lab}-")
