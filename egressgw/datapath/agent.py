"""The worker node's datapath: selected pods' external traffic and DNS go into egressgw's tunnel.

In: the tunnel settings, the cluster CIDRs and DNS addresses (fixed for a run), this node's tunnel
address, and at each apply which local pod addresses are steered to which gateway and which node
holds each gateway per address family (a ``steering.AgentPlan``). Out: the tunnel device and its
peers (``tunnel``), one nftables ``inet`` table of constant rules loaded in one ``nft``
transaction, whose set and map elements are written over netlink in one transaction per apply,
one routing table and one ``ip rule`` per gateway, and a blackhole rule behind them. It may not
touch anything else on the node: a packet that is not from a steered pod, or that stays in the
cluster, never matches a rule here, and the marks, tables and rule priorities it uses are its
own (``SteeringSettings``). It decides nothing: what is steered where is the plan's.

A packet from a pod, entering the node:

- prerouting, nat, priority dstnat - 10 (before a kube-proxy DNAT): DNS (UDP and TCP port 53)
  from a steered pod to a DNS address keeps its destination (an identity DNAT holds the flow's
  NAT binding, so no service DNAT sends it to a DNS pod instead); the gateway answers as the
  address the pod asked;
- prerouting, filter, priority dstnat + 10 (after every DNAT): source a steered pod and
  destination outside the cluster CIDRs (link-local, multicast and broadcast never leave), or a
  DNS address on port 53: the whole mark becomes the gateway's mark (what others set in our
  packet before is not kept: nft cannot OR a map's value into the mark); a gateway with no next
  hop of the packet's family: drop, so it never leaves with the node's address;
- routing: ``fwmark M/MASK lookup table_base+k`` (one table per gateway: ``default via <holder>
  dev egw0 onlink``, for IPv6 via the holder's link-local address); a marked packet that finds
  no route there meets ``not fwmark 0/MASK blackhole`` right behind: fail closed even between
  the steps of an apply;
- postrouting into the tunnel: an identity SNAT at priority srcnat - 10 holds the flow's NAT
  binding, so a CNI's masquerade (srcnat) never replaces the pod's address; the mark bits are
  cleared (the device's outer route lookup uses the inner packet's mark and would loop back
  into the tunnel); the TCP MSS is clamped to the tunnel's MTU.

And from the tunnel: outer packets only from the holders the plan names; inner packets only
toward steered pods, never to the node itself.

Restart: ``setup`` creates what is missing and adopts the rest (the device, sets and maps with
their elements, rules, routes); the constant rules are replaced in the same transaction that
keeps the elements, so an established steered connection does not see the restart.

Limits: a DNS address that is an address of the node itself (NodeLocal DNSCache's, or a service
address under kube-proxy's IPVS mode) is delivered by the ``local`` table, whose rule (priority
0) comes before any fwmark rule: such DNS is not steered. Neither is DNS that a CNI balances
inside the pod's socket calls (Cilium's socket load balancing), which never carries the DNS
address. A host-network pod's address is the node's, and the node's own packets never pass
prerouting: it is not steered.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import subprocess
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from egressgw.datapath import keys, skeleton
from egressgw.datapath.kernel import sync_elements
from egressgw.datapath.netlink import MAX_COMMENT_BYTES, Element, NftSocket
from egressgw.datapath.netns import call_in, command
from egressgw.datapath.tunnel import (
    DEFAULT_ROUTE,
    Changes,
    IPAddress,
    IPNetwork,
    Route,
    Rule,
    Tunnel,
    TunnelError,
    TunnelSettings,
    next_hop,
)

AGENT_TABLE = "egressgw_agent"
AGENT_VERSION = 2
# what older versions had: removed by every load
STALE_CHAINS = ("into_tunnel", "from_tunnel")
DNS_PORT = 53
# never steered: these do not leave the node's link, or are not unicast
NEVER_STEERED = {
    4: tuple(
        ipaddress.ip_network(n)
        for n in ("127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32")
    ),
    6: tuple(ipaddress.ip_network(n) for n in ("::1/128", "fe80::/10", "ff00::/8")),
}
_IP = {4: ("ipv4", "ip"), 6: ("ipv6", "ip6")}
_ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}


@dataclass(frozen=True)
class SteeringSettings:
    """Where the agent's marks, routing tables and rules live on the node.

    The default mark bits 0x7f leave alone kube-proxy (0x4000, 0x8000), Calico (0xffff0000),
    Cilium (0x0f00, 0xf000) and the AWS VPC CNI (0x80). A gateway gets mark value ``k << shift``
    (k = 1 .. capacity) and routing table ``table_base + k``; the all-ones value of the mask is
    the drop mark of pods whose gateway got no mark. Rules: ``rule_priority`` (lookups) and
    ``rule_priority + 1`` (the blackhole), before main and before the rules CNIs install
    (Cilium 100+, the AWS VPC CNI 512+).
    """

    mark_mask: int = 0x7F
    table_base: int = 7800
    rule_priority: int = 90

    def __post_init__(self) -> None:
        mask = self.mark_mask
        if mask <= 0 or mask > 0xFFFFFFFF:
            raise ValueError(f"mark mask {mask:#x} is not a 32-bit mask")
        low = mask & -mask
        if (mask + low) & mask:
            raise ValueError(f"mark mask {mask:#x} is not one run of contiguous bits")
        if mask // low < 2:
            raise ValueError(f"mark mask {mask:#x} leaves no mark for any gateway")
        last = self.table_base + mask // low
        reserved = {0, 253, 254, 255}
        if (
            self.table_base < 0
            or last > 0xFFFFFFFF
            or reserved & set(range(self.table_base + 1, min(last, 256) + 1))
        ):
            raise ValueError(
                f"routing tables {self.table_base + 1}..{last} overlap the kernel's own"
                " (0, 253 default, 254 main, 255 local) or leave 32 bits"
            )
        if not 0 < self.rule_priority < 32765:
            raise ValueError(f"rule priority {self.rule_priority} is outside 1..32764")

    @property
    def shift(self) -> int:
        return (self.mark_mask & -self.mark_mask).bit_length() - 1

    @property
    def capacity(self) -> int:
        """How many gateways can be told apart (one value of the mask is the drop mark)."""
        return (self.mark_mask >> self.shift) - 1

    @property
    def drop_mark(self) -> int:
        return self.mark_mask

    def mark(self, slot: int) -> int:
        return slot << self.shift

    def slot(self, mark: int) -> int:
        return (mark & self.mark_mask) >> self.shift

    def table(self, slot: int) -> int:
        return self.table_base + slot

    @property
    def tables(self) -> range:
        return range(self.table_base + 1, self.table_base + self.capacity + 1)

    @property
    def priorities(self) -> tuple[int, int]:
        return (self.rule_priority, self.rule_priority + 1)


class Steering(Protocol):
    """What the agent reads of a ``steering.AgentPlan``."""

    @property
    def steered(self) -> Mapping[IPAddress, str]:
        """Address of a pod on this node -> name of the gateway it leaves through."""
        ...

    @property
    def next_hops(self) -> Mapping[tuple[str, int], IPAddress]:
        """(gateway name, family) -> tunnel address of the node holding it; absent: none."""
        ...


def gateway_label(name: str) -> str:
    """How a gateway is named in the kernel (an element comment): its name, or a digest of a
    name longer than a comment holds (a Kubernetes name may have 253 bytes)."""
    if len(name.encode()) <= MAX_COMMENT_BYTES:
        return name
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def assign_slots(
    labels: Iterable[str], current: Mapping[str, int], capacity: int
) -> tuple[dict[str, int], list[str]]:
    """A slot (1..capacity) for each label: the one it has in ``current`` if it is valid,
    else the lowest slot no label holds or held, else the lowest free one. Returns the
    assignment and the labels left without a slot (more gateways than slots)."""
    wanted = sorted(set(labels))
    assigned: dict[str, int] = {}
    taken: set[int] = set()
    for label in wanted:
        slot = current.get(label)
        if slot is not None and 0 < slot <= capacity and slot not in taken:
            assigned[label] = slot
            taken.add(slot)
    released = set(current.values()) - taken
    fresh = (s for s in range(1, capacity + 1) if s not in taken and s not in released)
    recycled = (s for s in sorted(released) if 0 < s <= capacity)
    left: list[str] = []
    for label in wanted:
        if label in assigned:
            continue
        slot = next(fresh, None) or next(recycled, None)
        if slot is None:
            left.append(label)
            continue
        assigned[label] = slot
        taken.add(slot)
    return assigned, left


def _collapsed(networks: Iterable[IPNetwork], family: int) -> list[IPNetwork]:
    chosen = [n for n in networks if n.version == family]
    return list(ipaddress.collapse_addresses(chosen))  # type: ignore[type-var]


def render(
    table: str,
    tunnel: TunnelSettings,
    steering: SteeringSettings,
    cluster_cidrs: Sequence[IPNetwork],
    dns_addresses: Sequence[IPAddress],
) -> str:
    """The agent's table as one nft script: sets and maps are added (their elements kept), the
    chains' rules replaced. Nothing in it depends on pods or gateways."""
    skeleton.check_ifname(tunnel.device)
    dev = tunnel.device
    lines = [f'add table inet {table} {{ comment "egressgw agent v{AGENT_VERSION}"; }}']
    specs = [skeleton.SetSpec("gateways", "mark")]  # one per gateway, named in its comment
    for f in (4, 6):
        specs += [
            skeleton.SetSpec(f"steered{f}", _ADDR_TYPE[f], "mark"),  # pod -> gateway mark
            skeleton.SetSpec(f"routable{f}", "mark"),  # gateway marks with a next hop
            skeleton.SetSpec(f"peers{f}", _ADDR_TYPE[f]),  # holders the tunnel comes from
        ]
    lines += [spec.declaration(table) for spec in specs]
    # what comes out of the tunnel may only go to a steered pod (never to the node itself):
    # checked here rather than in a forward chain of its own, one hook fewer per packet
    rules: dict[str, list[str]] = {
        "keep_destination": [],
        "steer": [f'iifname "{dev}" goto arrived'],
        "arrived": [
            "meta nfproto ipv4 ip daddr != @steered4 counter drop",
            "meta nfproto ipv6 ip6 daddr != @steered6 counter drop",
        ],
    }
    for f in (4, 6):
        nfproto, ip = _IP[f]
        dns = sorted({a for a in dns_addresses if a.version == f})
        dns_set = "{ " + ", ".join(map(str, dns)) + " }"
        dns_match = f"{ip} daddr {dns_set} meta l4proto {{ tcp, udp }} th dport {DNS_PORT}"
        stay = _collapsed([*NEVER_STEERED[f], *cluster_cidrs], f)
        if dns:
            rules["keep_destination"].append(
                f"meta nfproto {nfproto} {ip} saddr @steered{f} {dns_match} dnat {ip} to {ip} daddr"
            )
        rules["steer"].append(f"meta nfproto {nfproto} {ip} saddr @steered{f} goto steer{f}")
        # a steered pod's packet toward the outside: three rules; toward the cluster: its DNS
        # to a DNS address is steered too (a DNS address outside the cluster CIDRs is outside)
        mark = [
            f"meta mark set {ip} saddr map @steered{f}",
            f"meta mark != @routable{f} counter drop",
        ]
        rules[f"steer{f}"] = [f"{ip} daddr {{ {', '.join(map(str, stay))} }} goto inside{f}", *mark]
        rules[f"inside{f}"] = [f"{dns_match} goto mark{f}"] if dns else []
        rules[f"mark{f}"] = mark
    keep = 0xFFFFFFFF & ~steering.mark_mask
    rules["keep_source"] = [
        f'oifname "{dev}" meta nfproto ipv4 snat ip to ip saddr',
        f'oifname "{dev}" meta nfproto ipv6 snat ip6 to ip6 saddr',
    ]
    # forwarded packets only (the node's own traffic never passes it), one rule, one device
    # name compare: the mark is cleared (the outer packet's route must not follow it), then a
    # TCP handshake gets its MSS clamped to the tunnel's MTU
    rules["to_tunnel"] = [
        f'oifname "{dev}" meta mark set meta mark and {keep:#010x} '
        "tcp flags syn tcp option maxseg size set rt mtu",
    ]
    untracked, untracked_hooks = skeleton.untracked_chains(
        "untracked", tunnel.port, lambda f: f"peers{f}"
    )
    # what comes out of the tunnel to the node itself is dropped by ``arrived``, and what
    # comes to the tunnel's port from anyone but a peer by ``untracked_peer``: no input hook
    rules |= untracked
    hooks = {
        "keep_destination": "type nat hook prerouting priority dstnat - 10; policy accept;",
        "steer": "type filter hook prerouting priority dstnat + 10; policy accept;",
        "keep_source": "type nat hook postrouting priority srcnat - 10; policy accept;",
        "to_tunnel": "type filter hook forward priority filter; policy accept;",
        **untracked_hooks,
    }
    for chain in rules:
        hook = hooks.get(chain)
        lines.append(f"add chain inet {table} {chain}" + (f" {{ {hook} }}" if hook else ""))
        lines.append(f"flush chain inet {table} {chain}")
    for chain, chain_rules in rules.items():
        lines += [f"add rule inet {table} {chain} {rule}" for rule in chain_rules]
    lines += skeleton.removed_chains(table, STALE_CHAINS)
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class AgentState:
    """What one apply wants in the kernel: nft elements per set, routes, rules, peers."""

    elements: dict[str, list[Element]]
    routes: list[Route]
    rules: set[Rule]
    peers: set[IPAddress]
    notes: list[str]


def desired(
    plan: Steering,
    local: IPAddress,
    steering: SteeringSettings,
    current: Mapping[str, int],
) -> AgentState:
    """The kernel state for ``plan`` on the node at ``local`` (pure). ``current``: the slots the
    kernel already gives each gateway label (kept, so a restart renumbers nothing)."""
    notes: list[str] = []
    names = set(plan.steered.values())  # a gateway none of this node's pods uses is no peer
    labels = {name: gateway_label(name) for name in names}
    slots, left = assign_slots(labels.values(), current, steering.capacity)
    for label in left:
        notes.append(
            f"gateway {label}: more gateways than the {steering.capacity} marks of mask "
            f"{steering.mark_mask:#x}; its pods' external traffic is dropped"
        )
    routes: list[Route] = []
    routable: dict[int, set[int]] = {4: set(), 6: set()}
    peers: set[IPAddress] = set()
    for (name, family), holder in sorted(
        plan.next_hops.items(), key=lambda i: (i[0], i[1].version, i[1])
    ):
        slot = slots.get(labels[name]) if name in labels else None
        if slot is None or family not in (4, 6):
            continue
        if holder == local:
            notes.append(f"gateway {name}: this node holds it; a node cannot steer to itself")
            continue
        if holder.version != local.version:
            notes.append(f"gateway {name}: holder {holder} is not reachable over this tunnel")
            continue
        hop = next_hop(holder, family)
        if hop is None:
            notes.append(f"gateway {name}: no IPv{family} next hop over holder {holder}")
            continue
        routes.append(Route(steering.table(slot), DEFAULT_ROUTE[family], hop))
        routable[family].add(steering.mark(slot))
        peers.add(holder)
    elements: dict[str, list[Element]] = {
        "gateways": [
            Element(key=keys.mark(steering.mark(slot)), comment=label)
            for label, slot in sorted(slots.items())
        ]
    }
    for family in (4, 6):
        elements[f"steered{family}"] = []
        elements[f"routable{family}"] = [
            Element(key=keys.mark(m)) for m in sorted(routable[family])
        ]
        elements[f"peers{family}"] = [
            Element(key=p.packed) for p in sorted(peers) if p.version == family
        ]
    for pod, name in sorted(plan.steered.items(), key=lambda i: (i[0].version, i[0])):
        if pod == local:
            notes.append(f"pod {pod} has this node's address; not steered")
            continue
        slot = slots.get(labels[name])
        mark = steering.mark(slot) if slot is not None else steering.drop_mark
        elements[f"steered{pod.version}"].append(Element(key=pod.packed, data=keys.mark(mark)))
    rules = blackhole_rules(steering)
    for slot in sorted(slots.values()):
        for family in (4, 6):
            rules.add(
                Rule(
                    family,
                    steering.rule_priority,
                    table=steering.table(slot),
                    fwmark=steering.mark(slot),
                    fwmask=steering.mark_mask,
                )
            )
    return AgentState(elements, routes, rules, peers, list(dict.fromkeys(notes)))


def blackhole_rules(steering: SteeringSettings) -> set[Rule]:
    """``not fwmark 0/MASK blackhole``: a marked packet no gateway table routes goes nowhere."""
    return {
        Rule(f, steering.rule_priority + 1, fwmask=steering.mark_mask, blackhole=True, invert=True)
        for f in (4, 6)
    }


class AgentDatapath:
    """The agent's kernel side on one worker node. Synchronous; call it off the event loop."""

    def __init__(
        self,
        tunnel: TunnelSettings,
        cluster_cidrs: Sequence[IPNetwork],
        dns_addresses: Sequence[IPAddress],
        table: str = AGENT_TABLE,
        netns: str | None = None,
        *,
        steering: SteeringSettings | None = None,
    ) -> None:
        self.settings = tunnel
        self.cluster_cidrs = tuple(cluster_cidrs)
        self.dns_addresses = tuple(dns_addresses)
        self.table = table
        self.netns = netns
        self.steering = steering or SteeringSettings()
        self.script = render(
            table, tunnel, self.steering, self.cluster_cidrs, self.dns_addresses
        )  # refuses bad settings before anything is touched
        self.tunnel = Tunnel(tunnel, netns)
        self._sock: NftSocket | None = None
        self._lock = threading.Lock()

    def setup(self, local: IPAddress) -> Changes:
        """Create or adopt the device, the table (its elements kept) and the blackhole rules.
        Routes and per-gateway rules a previous run left stay until ``apply`` says otherwise."""
        with self._lock:
            changes = self.tunnel.setup(local)
            skeleton.run_script(self.script, f"the agent table {self.table}", self.netns)
            changes += self.tunnel.sync_rules(
                [self.steering.rule_priority + 1], blackhole_rules(self.steering)
            )
            if self._sock is None:
                self._sock = call_in(self.netns, lambda: NftSocket(self.table))
            return changes

    def gateways(self) -> dict[str, int]:
        """Gateway label -> slot, as the kernel has them."""
        found: dict[str, int] = {}
        for element in self._socket().dump("gateways"):
            if element.comment is not None:
                found[element.comment] = self.steering.slot(keys.parse_mark(element.key))
        return found

    def _socket(self) -> NftSocket:
        if self._sock is None:
            raise TunnelError("AgentDatapath used before setup")
        return self._sock

    def apply(self, plan: Steering) -> Changes:
        """Make the kernel steer as ``plan`` says; idempotent. In order: new holders accepted
        as tunnel sources (nft), their FDB and neighbour entries, rules and routes (a holder
        change is one route replaced in place), then every element in one nft transaction
        (which pods are steered, which gateways are routable), then what is no longer wanted
        (routes, rules, peers) removed. So a path is open before packets are sent down it and
        closed after they stop. Each step is atomic, the whole is not: a failure midway leaves
        only opened paths behind, and the next apply converges. What the plan asks and cannot
        be done is in the result's notes (the same at every apply: log them when they
        change)."""
        with self._lock:
            local = self.tunnel.local
            sock = self._socket()
            if local is None:
                raise TunnelError("AgentDatapath used before setup")
            state = desired(plan, local, self.steering, self.gateways())
            changes = Changes(notes=list(state.notes))
            tables = self.steering.tables
            priorities = self.steering.priorities
            peers = {n: state.elements[n] for n in ("peers4", "peers6")}
            changes.added += sync_elements(sock, peers, prune=False)[0]  # their replies
            changes += self.tunnel.sync_peers(state.peers, prune=False)
            changes += self.tunnel.sync_rules(priorities, state.rules, prune=False)
            changes += self.tunnel.sync_routes(tables, state.routes, prune=False)
            added, removed = sync_elements(sock, state.elements)
            changes.added += added
            changes.removed += removed
            changes += self.tunnel.sync_routes(tables, state.routes)
            changes += self.tunnel.sync_rules(priorities, state.rules)
            changes += self.tunnel.sync_peers(state.peers)
            return changes

    def dropped(self) -> int:
        """Packets of steered pods dropped for want of a next hop, since the table was made."""
        return _counted(self.table, ("steer4", "mark4", "steer6", "mark6"), self.netns)

    def remove(self) -> None:
        """Uninstall: the table first (nothing is marked any more), then rules, routes, device."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if skeleton.listing(self.table, self.netns) is not None:
                skeleton.run_script(
                    f"delete table inet {self.table}\n", f"removing {self.table}", self.netns
                )
            self.tunnel.sync_rules(self.steering.priorities, ())
            self.tunnel.sync_routes(self.steering.tables, ())
            self.tunnel.remove()

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            self.tunnel.close()


def _counted(table: str, chains: Sequence[str], netns: str | None) -> int:
    """The packets counted by the anonymous counters of ``chains``."""
    total = 0
    for chain in chains:
        argv = command(netns, ["nft", "-j", "list", "chain", "inet", table, chain])
        proc = subprocess.run(argv, capture_output=True, text=True, check=True)
        for entry in json.loads(proc.stdout).get("nftables", []):
            for statement in entry.get("rule", {}).get("expr", []):
                if "counter" in statement:
                    total += int(statement["counter"].get("packets", 0))
    return total
