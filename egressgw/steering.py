"""Which node holds which egress IP, and what the tunnel carries between worker and gateway nodes.

In: a Snapshot (its Nodes, and each Pod's node name) and who holds each egress IP (manifests
mode: ``manifest_holders``; Kubernetes mode: the Leases). Out: for a worker node, an
``AgentPlan`` (which of its pods are steered, to which node, per address family); for a gateway
node, a ``TunnelPeers`` (which pod addresses it accepts from which node, and routes replies back
to). Pure: no I/O, no clock. Selection (which gateway a pod leaves through) is the plan's.

Rules:

- a pod is steered when an EgressGateway selects it, by ``policy.select`` exactly as the gateway
  plan selects it: the gateway whose name sorts first wins, and an address claimed by two pods
  belongs to neither, so it is never steered nor accepted;
- only the addresses of pods that the snapshot places on a node (``spec.nodeName``) are steered
  from it, and a gateway node accepts a pod address only from the tunnel address of that node:
  a pod cannot borrow the address of a pod on another node;
- a gateway's egress IPs are those ``plan.owned_egress_ips`` leaves it. Per address family, its
  traffic goes to the node holding the first of them, in ``egressIPs`` order, whose holder is a
  known Node with a tunnel address. The agent (``next_hops``) and the gateway node
  (``TunnelPeers``) make that same choice, so exactly one gateway node accepts each pod address;
- no such egress IP: no next hop, and the agent drops that family's traffic (fail closed): it
  never leaves with the worker node's address.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from egressgw.plan import owned_egress_ips
from egressgw.policy.model import IPAddress, Node, Snapshot
from egressgw.policy.select import WorkloadIndex, WorkloadSelection, index_workloads

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


@dataclass(frozen=True)
class Route:
    """Where a gateway's traffic of one address family goes."""

    egress_ip: IPAddress
    node: str  # the holder of ``egress_ip``
    tunnel_address: IPAddress  # that node's


def manifest_holders(snapshot: Snapshot) -> dict[IPAddress, str]:
    """Manifests mode: every egress IP of a gateway is held by the first Node, by name, that the
    gateway's ``nodeSelector`` matches (no nodeSelector: any Node)."""
    nodes = sorted(snapshot.nodes, key=lambda n: n.name)
    holders: dict[IPAddress, str] = {}
    for gateway, egress_ips in owned_egress_ips(snapshot.gateways, []):
        selector = gateway.node_selector
        holder = next(
            (n.name for n in nodes if selector is None or selector.matches(n.labels)), None
        )
        if holder is not None:
            holders.update((address, holder) for address in egress_ips)
    return holders


class _Routes:
    """The route of each (gateway, family), chosen once, or why there is none."""

    def __init__(self, snapshot: Snapshot, nodes: Mapping[str, Node], holders: Holders) -> None:
        self.egress_ips: dict[str, tuple[IPAddress, ...]] = {}
        for gateway, egress_ips in owned_egress_ips(snapshot.gateways, []):
            self.egress_ips.setdefault(gateway.name, egress_ips)
        self.nodes, self.holders = nodes, holders
        self._chosen: dict[tuple[str, int], Route | str] = {}

    def route(self, gateway: str, family: int) -> Route | str:
        """The route, or a reason there is none."""
        key = (gateway, family)
        found = self._chosen.get(key)
        if found is None:
            found = self._chosen[key] = self._choose(gateway, family)
        return found

    def _choose(self, gateway: str, family: int) -> Route | str:
        candidates = [a for a in self.egress_ips.get(gateway, ()) if a.version == family]
        if not candidates:
            return f"it has no IPv{family} egress IP"
        why: list[str] = []
        for address in candidates:
            holder = self.holders.get(address)
            node = self.nodes.get(holder) if holder is not None else None
            if holder is None:
                why.append(f"{address} has no holder")
            elif node is None:
                why.append(f"{address} is held by Node {holder}, which is not known")
            elif node.tunnel_address is None:
                why.append(f"{address} is held by Node {holder}, which has no InternalIP")
            else:
                return Route(address, holder, node.tunnel_address)
        return "; ".join(why)


def _nodes(snapshot: Snapshot) -> dict[str, Node]:
    nodes: dict[str, Node] = {}
    for node in snapshot.nodes:
        nodes.setdefault(node.name, node)
    return nodes


def _local(nodes: Mapping[str, Node], node_name: str, notes: list[str]) -> IPAddress | None:
    node = nodes.get(node_name)
    if node is None:
        notes.append(f"Node {node_name} is not known: the tunnel has no local address")
        return None
    if node.tunnel_address is None:
        notes.append(f"Node {node_name} has no InternalIP: the tunnel has no local address")
    return node.tunnel_address


def _selected(index: WorkloadIndex) -> list[tuple[IPAddress, WorkloadSelection, str]]:
    """(address, selection, gateway name) of every address an EgressGateway owns, by address."""
    found = [
        (address, selection, selection.gateway.name)
        for address, selection in index.by_address.items()
        if selection.gateway is not None
    ]
    found.sort(key=lambda item: (item[0].version, item[0]))
    return found


def _pod_name(selection: WorkloadSelection) -> str:
    return f"{selection.pod.namespace}/{selection.pod.name}"


def agent_plan(snapshot: Snapshot, node_name: str, holders: Holders) -> AgentPlan:
    """What the agent on ``node_name`` steers: every address of each pod the snapshot places on
    it that an EgressGateway selects, and per (gateway, family) the tunnel address of the node
    its traffic goes to (see the module's rules)."""
    notes: list[str] = []
    nodes = _nodes(snapshot)
    local = _local(nodes, node_name, notes)
    index = index_workloads(snapshot)
    here = {f"{p.namespace}/{p.name}" for p in snapshot.pods if p.node_name == node_name}
    for conflict in index.address_conflicts:
        if here.intersection(conflict.pods):
            notes.append(
                f"address {conflict.address} is claimed by pods {', '.join(conflict.pods)};"
                " it belongs to none of them and is not steered"
            )
    steered: dict[IPAddress, str] = {}
    for address, selection, gateway in _selected(index):
        if selection.pod.node_name == node_name:
            steered[address] = gateway
    routes = _Routes(snapshot, nodes, holders)
    next_hops: dict[tuple[str, int], IPAddress] = {}
    for gateway, family in sorted({(g, a.version) for a, g in steered.items()}):
        route = routes.route(gateway, family)
        if isinstance(route, Route):
            next_hops[(gateway, family)] = route.tunnel_address
        else:
            notes.append(
                f"EgressGateway {gateway}: no node to send IPv{family} traffic to ({route}); the"
                f" IPv{family} traffic of its pods on {node_name} is dropped"
            )
    return AgentPlan(node_name, local, steered, next_hops, tuple(notes))


def tunnel_peers(snapshot: Snapshot, node_name: str, holders: Holders) -> TunnelPeers:
    """What the gateway node ``node_name`` accepts from the tunnel: each address of a selected
    pod on another node whose gateway's traffic of that address's family goes to this node (the
    agents' choice), mapped to the tunnel address of the pod's node."""
    notes: list[str] = []
    nodes = _nodes(snapshot)
    local = _local(nodes, node_name, notes)
    routes = _Routes(snapshot, nodes, holders)
    pods: dict[IPAddress, IPAddress] = {}
    unreachable: dict[str, set[str]] = defaultdict(set)  # pod's node -> pods left out
    for address, selection, gateway in _selected(index_workloads(snapshot)):
        pod = selection.pod
        if pod.node_name == node_name:
            continue
        route = routes.route(gateway, address.version)
        if not isinstance(route, Route) or route.node != node_name:
            continue
        node = nodes.get(pod.node_name)
        if node is None or node.tunnel_address is None:
            unreachable[pod.node_name].add(_pod_name(selection))
            continue
        pods[address] = node.tunnel_address
    for name, left_out in sorted(unreachable.items()):
        one = len(left_out) == 1
        if not name:
            why = "has no node (spec.nodeName)" if one else "have no node (spec.nodeName)"
        else:
            why = f"{'runs' if one else 'run'} on Node {name}, which " + (
                "is not known" if name not in nodes else "has no InternalIP"
            )
        notes.append(
            f"{'pod' if one else 'pods'} {', '.join(sorted(left_out))} {why}: not accepted from"
            " the tunnel"
        )
    return TunnelPeers(node_name, local, pods, tuple(notes))
