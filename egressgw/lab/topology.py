"""The lab's fixed shape: namespaces, pods, nodes and every address, as plain data.

The example policies and the end-to-end tests rely on these exact values, so they live in one
place. Nothing here does I/O.
"""

from __future__ import annotations

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
DNS_V4 = "203.0.113.53"
DNS_V6 = "2001:db8:203::53"
BLOCKED_V4 = "203.0.113.30"
SERVICE_ADDRESSES: tuple[str, ...] = (DB_V4, WEB_V4, DNS_V4, DB_V6, WEB_V6, DNS_V6)

POSTGRES_PORT = 5432
POSTGRES_DATABASE = "orders"
POSTGRES_USER = "postgres"
# Only the payments project's egress IPs may connect over the network.
POSTGRES_ALLOWED_SOURCES: tuple[str, ...] = ("198.51.100.10/32", "2001:db8:100::10/128")
HTTP_PORTS: tuple[int, ...] = (80, 8080)
DNS_PORT = 53
# TTL of the lab DNS server's records (dnsmasq's own default, 0, would make every answer expire
# at once).
DNS_TTL_SECONDS = 60

DNS_DOMAIN = "lab.example"
DNS_HOST_RECORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("db.lab.example", (DB_V4, DB_V6)),
    ("web.lab.example", (WEB_V4, WEB_V6)),
    ("www.cdn.lab.example", (WEB_V4,)),
    ("blocked.lab.example", (BLOCKED_V4,)),
)
DNS_CNAMES: tuple[tuple[str, str], ...] = (("alias.lab.example", "web.lab.example"),)

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
