"""Which node holds which egress IP, and what the tunnel carries between worker and gateway nodes.

In: a Snapshot (its Nodes, and each Pod's node name) and who holds each egress IP (manifests
mode: ``manifest_holders``; Kubernetes mode: the Leases). Out: for a worker node, an
``AgentPlan`` (which of its pods are steered, to which node, per address family); for a gateway
node, a ``TunnelPeers`` (which pod addresses it accepts from which node, and routes replies back
to). Pure: no I/O, no clock. Selection (which gateway a pod leaves through) is the plan's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from egressgw.policy.model import IPAddress, Snapshot

Holders = Mapping[IPAddress, str]  # egress IP -> name of the node that holds it


@dataclass(frozen=True)
class AgentPlan:
    """What the agent on one worker node programs."""

    node: str
    local: IPAddress | None  # this node's tunnel address; None: the Node is not known
    # address of a pod on this node that an EgressGateway selects -> that gateway's name
    steered: Mapping[IPAddress, str] = field(default_factory=dict)
    # (gateway name, address family) -> tunnel address of the node that holds the gateway's
    # first held egress IP of that family; absent: no holder, that traffic is dropped
    next_hops: Mapping[tuple[str, int], IPAddress] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def peers(self) -> frozenset[IPAddress]:
        """Tunnel addresses of the gateway nodes this node sends to."""
        return frozenset(self.next_hops.values())


@dataclass(frozen=True)
class TunnelPeers:
    """What one gateway node accepts from the tunnel and routes replies back into."""

    node: str
    local: IPAddress | None  # this node's tunnel address; None: the Node is not known
    # address of a selected pod whose gateway's egress IP of that address's family this node
    # holds -> tunnel address of the node the pod runs on
    pods: Mapping[IPAddress, IPAddress] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def peers(self) -> frozenset[IPAddress]:
        """Tunnel addresses of the worker nodes whose pods this node serves."""
        return frozenset(self.pods.values())


def manifest_holders(snapshot: Snapshot) -> dict[IPAddress, str]:
    """Manifests mode: every egress IP of a gateway is held by the first Node, by name, that the
    gateway's ``nodeSelector`` matches (no nodeSelector: any Node)."""
    raise NotImplementedError


def agent_plan(snapshot: Snapshot, node_name: str, holders: Holders) -> AgentPlan:
    raise NotImplementedError


def tunnel_peers(snapshot: Snapshot, node_name: str, holders: Holders) -> TunnelPeers:
    raise NotImplementedError
