"""The lab's fixed shape: namespaces, pods, nodes and every address, as plain data.

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


@dataclass(frozen=True)
class LabNamespace:
    """A Kubernetes namespace of the lab (not a network namespace)."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LabPod:
    """A workload: one network namespace with ``eth0`` bridged on the worker."""

    namespace: str
    name: str
    labels: dict[str, str]
    ipv4: str
    ipv6: str
    worker_ifname: str  # the veth peer's name in the worker namespace (at most 15 characters)

    @property
    def key(self) -> str:
        """``namespace/name``, how the demo table and the tests name a pod."""
        return f"{self.namespace}/{self.name}"

    @property
    def project(self) -> str:
        return self.namespace


NAMESPACES: tuple[LabNamespace, ...] = (
    LabNamespace("payments", {"project": "payments"}),
    LabNamespace("analytics", {"project": "analytics"}),
    LabNamespace("sandbox", {}),
)

PODS: tuple[LabPod, ...] = (
    LabPod("payments", "api-0", {"app": "api"}, "192.0.2.10", "2001:db8:1::10", "v-api-0"),
    LabPod("analytics", "etl-0", {"app": "etl"}, "192.0.2.20", "2001:db8:1::20", "v-etl-0"),
    LabPod("sandbox", "shell-0", {"app": "shell"}, "192.0.2.30", "2001:db8:1::30", "v-shell-0"),
)

PODS_BY_KEY: dict[str, LabPod] = {pod.key: pod for pod in PODS}


def pod_by_key(key: str) -> LabPod:
    """The pod named ``namespace/name`` (or just ``name``); ValueError if the lab has none."""
    if key in PODS_BY_KEY:
        return PODS_BY_KEY[key]
    for pod in PODS:
        if pod.name == key:
            return pod
    raise ValueError(f"no pod {key!r} in the lab (pods: {', '.join(PODS_BY_KEY)})")


# Worker: bridges the pods and forwards everything else to the gateway.
POD_SUBNET_V4 = "192.0.2.0/24"
POD_SUBNET_V6 = "2001:db8:1::/64"
BRIDGE_V4 = "192.0.2.1"
BRIDGE_V6 = "2001:db8:1::1"
BRIDGE_IFNAME = "br0"
# Pods get a /25: with the bridge's /24 they would take the transit /29 (the gateway's
# 192.0.2.250) for on-link and ARP for it on the bridge instead of routing via the worker.
POD_PREFIX_V4 = 25
POD_PREFIX_V6 = 64

# Transit link worker <-> gateway.
TRANSIT_IFNAME = "tr0"
TRANSIT_WORKER_V4 = "192.0.2.249"
TRANSIT_GATEWAY_V4 = "192.0.2.250"
TRANSIT_PREFIX_V4 = 29
TRANSIT_WORKER_V6 = "2001:db8:ff::1"
TRANSIT_GATEWAY_V6 = "2001:db8:ff::2"
TRANSIT_PREFIX_V6 = 64
# What the gateway routes back to the worker (the /25 keeps clear of the transit /29).
GATEWAY_ROUTE_TO_PODS_V4 = "192.0.2.0/25"
GATEWAY_ROUTE_TO_PODS_V6 = POD_SUBNET_V6

# Gateway uplink into the external network. Egress IPs are added by the daemon, not the lab.
UPLINK_IFNAME = "up0"
GATEWAY_NODE_V4 = "198.51.100.2"
GATEWAY_NODE_V6 = "2001:db8:100::2"
EXT_V4 = "198.51.100.1"
EXT_V6 = "2001:db8:100::1"
UPLINK_PREFIX_V4 = 24
UPLINK_PREFIX_V6 = 64
EXT_IFNAME = "eth0"

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


DAEMON_HTTP_LISTEN = "127.0.0.1:9460"


@dataclass(frozen=True)
class NetnsNames:
    """The network namespace names of one lab, all prefixed by the lab name."""

    lab: str

    @property
    def worker(self) -> str:
        return f"{self.lab}-worker"

    @property
    def gateway(self) -> str:
        return f"{self.lab}-gw"

    @property
    def ext(self) -> str:
        return f"{self.lab}-ext"

    def pod(self, pod: LabPod) -> str:
        return f"{self.lab}-{pod.name}"

    @property
    def nodes(self) -> tuple[str, str, str]:
        return (self.worker, self.gateway, self.ext)

    def all(self) -> tuple[str, ...]:
        """Every namespace of the lab, in creation order (removal goes in reverse)."""
        return (*self.nodes, *(self.pod(pod) for pod in PODS))
