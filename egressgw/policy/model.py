"""The objects egressgw reads, as immutable values.

Instances are built by the loader (``egressgw.policy.load``) from validated YAML or API objects;
everything downstream treats them as plain data. Nothing here does I/O.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

API_GROUP = "egressgw.io"
API_VERSION = "egressgw.io/v1alpha1"


class Action(enum.StrEnum):
    ALLOW = "Allow"
    DENY = "Deny"


class Mode(enum.StrEnum):
    ENFORCE = "Enforce"
    AUDIT = "Audit"


class Protocol(enum.StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"

    @property
    def number(self) -> int:
        """IANA protocol number, as the kernel's ``meta l4proto`` sees it."""
        return {"TCP": 6, "UDP": 17, "SCTP": 132}[self.value]


class SelectorOperator(enum.StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclass(frozen=True)
class SelectorRequirement:
    key: str
    operator: SelectorOperator
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelSelector:
    """A Kubernetes label selector. The empty selector selects everything."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[SelectorRequirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, value in self.match_labels:
            if labels.get(key) != value:
                return False
        for req in self.match_expressions:
            present = key_present = req.key in labels
            if req.operator is SelectorOperator.IN:
                present = key_present and labels[req.key] in req.values
            elif req.operator is SelectorOperator.NOT_IN:
                present = not key_present or labels[req.key] not in req.values
            elif req.operator is SelectorOperator.DOES_NOT_EXIST:
                present = not key_present
            if not present:
                return False
        return True


EVERYTHING = LabelSelector()


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ips: tuple[IPAddress, ...] = ()
    node_name: str = ""  # spec.nodeName; empty: not scheduled (or not known)


@dataclass(frozen=True)
class Node:
    """A cluster node: its labels (for ``nodeSelector``) and its InternalIP addresses, which
    carry the tunnel between worker and gateway nodes."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    addresses: tuple[IPAddress, ...] = ()  # status.addresses of type InternalIP, in order

    @property
    def tunnel_address(self) -> IPAddress | None:
        """The address the tunnel reaches this node at: its first IPv4 InternalIP, else its
        first IPv6 one."""
        for address in self.addresses:
            if address.version == 4:
                return address
        return self.addresses[0] if self.addresses else None


@dataclass(frozen=True)
class EgressGateway:
    """Cluster-scoped: which workloads leave through which static egress IPs."""

    name: str
    namespace_selector: LabelSelector
    pod_selector: LabelSelector = EVERYTHING
    egress_ips: tuple[IPAddress, ...] = ()
    node_selector: LabelSelector | None = None
    default_action: Action = Action.DENY
    generation: int = 0


@dataclass(frozen=True)
class PortSpec:
    """One ``ports`` entry. ``port=None`` means every port of the protocol."""

    protocol: Protocol = Protocol.TCP
    port: int | None = None
    end_port: int | None = None

    @property
    def port_range(self) -> tuple[int, int]:
        """Inclusive (first, last) destination port range."""
        if self.port is None:
            return (0, 65535)
        return (self.port, self.end_port if self.end_port is not None else self.port)


@dataclass(frozen=True)
class Peer:
    """One ``to`` entry: exactly one of the three fields is set."""

    fqdn: str | None = None
    fqdn_pattern: str | None = None
    cidr: IPNetwork | None = None


@dataclass(frozen=True)
class EgressRule:
    action: Action = Action.ALLOW
    to: tuple[Peer, ...] = ()
    ports: tuple[PortSpec, ...] = ()  # empty: every port and protocol


@dataclass(frozen=True)
class EgressPolicy:
    """Namespaced: which destinations the selected pods of one project may reach."""

    namespace: str
    name: str
    pod_selector: LabelSelector = EVERYTHING
    mode: Mode = Mode.ENFORCE
    egress: tuple[EgressRule, ...] = ()
    generation: int = 0


@dataclass(frozen=True)
class RuleRef:
    """Names one rule of one policy, for decisions and logs: ``ns/name#index``."""

    namespace: str
    policy: str
    index: int

    def __str__(self) -> str:
        return f"{self.namespace}/{self.policy}#{self.index}"


@dataclass(frozen=True)
class Snapshot:
    """Every object of the desired state at one moment, from one source."""

    namespaces: Mapping[str, Namespace] = field(default_factory=dict)
    pods: tuple[Pod, ...] = ()
    gateways: tuple[EgressGateway, ...] = ()
    policies: tuple[EgressPolicy, ...] = ()
    nodes: tuple[Node, ...] = ()
