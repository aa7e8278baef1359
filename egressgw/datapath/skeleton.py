"""The constant ruleset: one ``inet`` table whose rules never change with workloads or policies.

In: the table name and the uplink interface. Out: an nft script that creates what is missing and
atomically replaces the rules of the chains, keeping every set and its elements (adoption): it uses
``add`` for the table and sets and never flushes a set. Loaded at start (and on upgrade) by
``nft -f -`` as one transaction; everything that varies afterwards is a set or map element.

Per packet leaving through the uplink: one conntrack cannot place (invalid) is dropped, since NAT
would skip it; then, on a new flow:
  workload address -> identity (a meta mark), unknown source -> reject;
  identity without an egress IP held here -> drop (never masqueraded to the node address);
  (identity . daddr . proto . dport) in a Deny set -> reject (or log and accept in Audit);
  ... in an Allow set (learned names with timeouts, CIDR rules without) -> accept;
  identity with defaultAction Allow -> accept; Audit identity -> log, count, accept; else reject.
  An accepted flow keeps its identity in ct mark, so later packets are counted per identity
  (``acct_accepted``); rejected and dropped first packets count in ``acct_rejected``.
  postrouting: SNAT to the identity's egress IP of the packet's family.
Reject is ICMP admin-prohibited so a client fails at once ("No route to host").

With a node name, ``render_tunnel`` adds the chains and sets of the tunnel from worker nodes to
the same table in a transaction of its own (``load_tunnel``); ``render`` is the same with or
without them, and adopting a table that has them keeps them.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from egressgw.datapath.netns import command

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SKELETON_VERSION = 3
OUTSIDE_CHAIN = "outside"  # filled by the tunnel, never flushed by ``render``
FAMILIES = (4, 6)
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")


@dataclass(frozen=True)
class SetSpec:
    name: str
    key_type: str
    data_type: str | None = None
    flags: tuple[str, ...] = ()
    counter: bool = False  # every element gets its own packet and byte counter
    keyword: str = "type"  # or "typeof": the key is given as the expressions it is matched with

    def declaration(self, table: str) -> str:
        kind = "map" if self.data_type else "set"
        typ = f"{self.key_type} : {self.data_type}" if self.data_type else self.key_type
        flags = f" flags {','.join(self.flags)};" if self.flags else ""
        counter = " counter;" if self.counter else ""
        return f"add {kind} inet {table} {self.name} {{ {self.keyword} {typ};{flags}{counter} }}"


def _addr(family: int) -> str:
    return "ipv4_addr" if family == 4 else "ipv6_addr"


def set_specs() -> tuple[SetSpec, ...]:
    specs = [
        SetSpec("identities", "mark"),  # elements carry the identity key as a comment
        SetSpec("audit", "mark"),
        SetSpec("default_allow", "mark"),
        # per-identity accounting of the traffic toward the uplink, summed per namespace
        SetSpec("acct_accepted", "mark", counter=True),
        SetSpec("acct_rejected", "mark", counter=True),
    ]
    for f in FAMILIES:
        a = _addr(f)
        port_key = f"mark . {a} . inet_proto . inet_service"
        specs += [
            SetSpec(f"workloads{f}", a, "mark"),
            SetSpec(f"snat{f}", "mark", a),
            SetSpec(f"egress_ips{f}", a),  # egress IPs this node holds on the uplink
            SetSpec(f"allow{f}", port_key, flags=("timeout",)),  # learned, exact port
            SetSpec(f"allow{f}_any", f"mark . {a}", flags=("timeout",)),  # learned, any port
            SetSpec(f"allow{f}_range", port_key, flags=("interval", "timeout")),  # learned, ranges
            SetSpec(f"allow{f}_net", port_key, flags=("interval",)),  # cidr rules
            SetSpec(f"deny{f}_net", port_key, flags=("interval",)),  # cidr deny rules
        ]
    return tuple(specs)


SET_SPECS = {spec.name: spec for spec in set_specs()}


def _forward_rules(uplink: str) -> list[str]:
    rules = [
        # what does not leave through the uplink is not the policy's: only the tunnel's rules
        # (in OUTSIDE_CHAIN, empty without a tunnel) look at it
        f'oifname != "{uplink}" goto {OUTSIDE_CHAIN}',
        # established packets of a workload's flow are counted under the identity kept in ct mark
        "ct state established,related ct mark @acct_accepted accept",
        "ct state established,related accept",
        # a packet conntrack cannot place (a lone RST, an ACK of a flow it never saw) skips NAT:
        # it would leave with the workload's own address
        "ct state invalid counter drop",
        "meta mark set 0",
        "meta nfproto ipv4 meta mark set ip saddr map @workloads4",
        "meta nfproto ipv6 meta mark set ip6 saddr map @workloads6",
        "meta mark 0 counter reject with icmpx admin-prohibited",
    ]
    for f, ip in ((4, "ip"), (6, "ip6")):
        nf = f"meta nfproto ipv{f}"
        tuple4 = f"meta mark . {ip} daddr . meta l4proto . th dport"
        rules += [
            f"{nf} meta mark != @snat{f} goto no_egress_ip",
            f"{nf} {tuple4} @deny{f}_net goto denied",
            f"{nf} {tuple4} @allow{f} goto accepted",
            f"{nf} meta mark . {ip} daddr @allow{f}_any goto accepted",
            f"{nf} {tuple4} @allow{f}_range goto accepted",
            f"{nf} {tuple4} @allow{f}_net goto accepted",
        ]
    rules += ["meta mark @default_allow goto accepted", "goto denied"]
    return rules


CHAIN_RULES = {
    "accepted": [
        "ct mark set meta mark",
        "meta mark @acct_accepted accept",
        "accept",
    ],
    "denied": [
        "meta mark @audit goto audited",
        "meta mark @acct_rejected reject with icmpx admin-prohibited",
        "reject with icmpx admin-prohibited",
    ],
    "audited": [
        'counter log prefix "egressgw audit: "',
        "goto accepted",
    ],
    "no_egress_ip": [
        "meta mark @acct_rejected drop",
        "drop",
    ],
}


def check_ifname(name: str) -> str:
    """``name`` if it is a valid interface name to put in a rule, else ValueError."""
    if not _IFNAME.match(name):
        raise ValueError(f"invalid interface name {name!r}")
    return name


def render(table: str, uplink: str) -> str:
    """The whole skeleton as one nft script (one transaction)."""
    if not _IFNAME.match(uplink):
        raise ValueError(f"invalid uplink interface name {uplink!r}")
    lines = [f'add table inet {table} {{ comment "egressgw ruleset v{SKELETON_VERSION}"; }}']
    lines += [spec.declaration(table) for spec in SET_SPECS.values()]
    hooks = {
        "forward": "type filter hook forward priority filter; policy accept;",
        "postrouting": "type nat hook postrouting priority srcnat; policy accept;",
    }
    rules = {
        "forward": _forward_rules(uplink),
        **CHAIN_RULES,
        "postrouting": [
            f'oifname != "{uplink}" return',
            "meta mark 0 return",
            "meta nfproto ipv4 snat ip to meta mark map @snat4",
            "meta nfproto ipv6 snat ip6 to meta mark map @snat6",
        ],
    }
    lines.append(f"add chain inet {table} {OUTSIDE_CHAIN}")
    for chain in rules:  # every chain exists and is empty before any rule jumps to one
        hook = hooks.get(chain)
        lines.append(f"add chain inet {table} {chain}" + (f" {{ {hook} }}" if hook else ""))
        lines.append(f"flush chain inet {table} {chain}")
    for chain, chain_rules in rules.items():
        lines += [f"add rule inet {table} {chain} {rule}" for rule in chain_rules]
    return "\n".join(lines) + "\n"


def rule_count(table: str, uplink: str) -> int:
    return sum(1 for line in render(table, uplink).splitlines() if line.startswith("add rule"))


class SkeletonError(RuntimeError):
    pass


def run_script(script: str, what: str, netns: str | None = None) -> None:
    """Load an nft script as one transaction in a network namespace (None: this one)."""
    argv = command(netns, ["nft", "-f", "-"])
    proc = subprocess.run(argv, input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SkeletonError(f"nft refused {what}: {proc.stderr.strip()}")


def listing(table: str, netns: str | None = None) -> dict[str, set[str]] | None:
    """The chains and sets (maps included) of ``table``, or None if it does not exist."""
    argv = command(netns, ["nft", "-j", "list", "table", "inet", table])
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr:
            return None
        raise SkeletonError(f"nft could not list table {table}: {proc.stderr.strip()}")
    found: dict[str, set[str]] = {"chain": set(), "set": set()}
    for entry in json.loads(proc.stdout).get("nftables", []):
        for kind in ("chain", "set", "map"):
            if kind in entry:
                found["chain" if kind == "chain" else "set"].add(entry[kind]["name"])
    return found


def load(table: str, uplink: str, netns: str | None = None) -> None:
    """Create or upgrade the skeleton in a network namespace (None: this one), one transaction."""
    run_script(render(table, uplink), f"the ruleset of table {table}", netns)


# --- the tunnel from worker nodes (gateway side, with a node name only) ---------------------
#
# Offsets are bits from the start of the outer UDP payload: the VXLAN header (8 bytes), the
# inner Ethernet header (destination and source MAC, 12 bytes, then the ethertype), then the
# inner IP header, whose source address starts 12 bytes in (IPv4) or 8 bytes in (IPv6).
INNER_ETHERTYPE = "@ih,160,16"
INNER_SOURCE = {4: "@ih,272,32", 6: "@ih,240,128"}
ETHERTYPE = {4: "0x0800", 6: "0x86dd"}
_OUTER = {4: ("ipv4", "ip"), 6: ("ipv6", "ip6")}
TUNNEL_CHAINS = (
    "tunnel_untracked",
    "tunnel_untracked_peer",
    "tunnel_untracked_out",
    "tunnel_in",
    "tunnel_check",
    "tunnel_local",
    "tunnel_dns",
)
STALE_TUNNEL_CHAINS = ("tunnel_forward",)  # what older versions had, removed on load
DNS_PORT = 53


def tunnel_set_name(outer: int, inner: int) -> str:
    """The set of (worker tunnel address . pod address) over an IPv``outer`` tunnel."""
    return f"tunnel{outer}_pods{inner}"


def tunnel_peers_set(outer: int) -> str:
    """The set of worker tunnel addresses of an IPv``outer`` tunnel."""
    return f"tunnel{outer}_peers"


def untracked_chains(
    chain: str, port: int, peers: Callable[[int], str]
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(rules, hooks) of the raw chains that keep a tunnel's outer packets out of conntrack,
    on workers and gateways alike: ``chain`` (prerouting) and ``<chain>_peer`` for what arrives
    from a peer in the set ``peers(family)``, ``<chain>_out`` (output) for what leaves to one.
    What comes to this node's tunnel port from anyone else is dropped there and counted: only
    peers reach the tunnel device, and no input hook has to look at the node's own traffic.

    Outer packets are not tracked: each inner flow hashes to an outer source port of its own,
    so tracking them would cost a second conntrack entry (and a NAT lookup) per tunnelled
    connection, and nothing matches an outer packet's connection state. Every packet of the
    node passes ``chain``: anything not to the tunnel's port costs it one rule."""
    rules = {
        chain: [f"udp dport {port} goto {chain}_peer"],
        f"{chain}_peer": [
            *(
                f"meta nfproto {_OUTER[f][0]} {_OUTER[f][1]} saddr @{peers(f)} notrack accept"
                for f in FAMILIES
            ),
            # what passes through this node to that port is not the tunnel's: left alone
            "fib daddr type local counter drop",
        ],
        f"{chain}_out": [
            f"meta nfproto {_OUTER[f][0]} udp dport {port} {_OUTER[f][1]} daddr @{peers(f)} "
            "notrack accept"
            for f in FAMILIES
        ],
    }
    hooks = {
        chain: "type filter hook prerouting priority raw; policy accept;",
        f"{chain}_out": "type filter hook output priority raw; policy accept;",
    }
    return rules, hooks


TUNNEL_SET_SPECS = {
    **{
        tunnel_set_name(outer, inner): SetSpec(
            tunnel_set_name(outer, inner),
            f"{_OUTER[outer][1]} saddr . {INNER_SOURCE[inner]}",
            keyword="typeof",
        )
        for outer in FAMILIES
        for inner in FAMILIES
    },
    **{
        tunnel_peers_set(outer): SetSpec(
            tunnel_peers_set(outer), "ipv4_addr" if outer == 4 else "ipv6_addr"
        )
        for outer in FAMILIES
    },
}


def render_tunnel(
    table: str,
    uplink: str,
    device: str,
    port: int,
    dns_redirect: Sequence[tuple[IPAddress, int]] = (),
) -> str:
    """The gateway's tunnel chains and sets, added to the gateway's own table (which must
    exist), as one nft script; the rest of the table is left as it is.

    - input, outer packets: a packet to the tunnel's UDP port goes on only if (outer source .
      inner source) is in the set for its pair of families: the inner source must be a pod that
      the desired state places on the node the packet came from. Anything else to that port
      (another inner ethertype, a truncated packet) is dropped;
    - input, inner packets: a packet from the tunnel reaches this node only as the DNS that
      ``tunnel_dns`` redirected, or as part of a flow already established;
    - prerouting (nat, before the node's own DNAT): DNS (UDP and TCP port 53) from the tunnel
      goes to ``dns_redirect`` of its family; without one for its family it is forwarded
      like any other traffic, under the policy;
    - raw, outer packets (to the tunnel's UDP port, from a worker or to one): not tracked
      (``untracked_chains``, as on the workers);
    - forward, in the skeleton's ``outside`` chain (what does not leave through the uplink,
      so no forward hook of its own): what comes out of the tunnel leaves only through the
      uplink, where the gateway's forward and SNAT rules apply to it as to any workload; TCP
      handshakes into the tunnel get their MSS clamped to its MTU.
    """
    check_ifname(uplink)
    check_ifname(device)
    redirect: dict[int, tuple[IPAddress, int]] = {}
    for address, to_port in dns_redirect:
        if address.is_unspecified or address.is_loopback or address.is_multicast:
            raise ValueError(
                f"DNS redirect to {address}: tunnelled DNS needs a unicast address of this node"
                " that forwarded packets can be DNATed to (not unspecified or loopback)"
            )
        if address.version in redirect:
            raise ValueError(f"more than one IPv{address.version} DNS redirect")
        if not 0 < to_port < 65536:
            raise ValueError(f"DNS redirect port {to_port} is not a port")
        redirect[address.version] = (address, to_port)
    check = []
    for outer in FAMILIES:
        nfproto, outer_ip = _OUTER[outer]
        for inner in FAMILIES:
            check.append(
                f"meta nfproto {nfproto} {INNER_ETHERTYPE} {ETHERTYPE[inner]} "
                f"{outer_ip} saddr . {INNER_SOURCE[inner]} @{tunnel_set_name(outer, inner)} return"
            )
    check.append("counter drop")
    dns = [f'iifname != "{device}" return']
    for family, (address, to_port) in sorted(redirect.items()):
        nfproto, ip = _OUTER[family]
        target = f"{address}:{to_port}" if family == 4 else f"[{address}]:{to_port}"
        dns.append(
            f"meta nfproto {nfproto} meta l4proto {{ tcp, udp }} th dport {DNS_PORT} "
            f"dnat {ip} to {target}"
        )
    untracked, untracked_hooks = untracked_chains("tunnel_untracked", port, tunnel_peers_set)
    rules = {
        **untracked,
        # outer packets first: one rule to their check. A tunnelled packet to that port (no
        # outer packet: its source is a pod's) fails the same check
        "tunnel_in": [
            f"udp dport {port} goto tunnel_check",
            f'iifname "{device}" goto tunnel_local',
        ],
        "tunnel_check": check,
        "tunnel_local": [
            "ct state established,related return",
            "ct status dnat return",
            "counter drop",
        ],
        "tunnel_dns": dns,
        OUTSIDE_CHAIN: [
            f'iifname "{device}" counter drop',
            f'oifname "{device}" tcp flags syn tcp option maxseg size set rt mtu',
        ],
    }
    hooks = {
        **untracked_hooks,
        "tunnel_in": "type filter hook input priority filter; policy accept;",
        "tunnel_dns": "type nat hook prerouting priority dstnat - 10; policy accept;",
    }
    lines = [spec.declaration(table) for spec in TUNNEL_SET_SPECS.values()]
    for chain in (*TUNNEL_CHAINS, OUTSIDE_CHAIN):
        hook = hooks.get(chain)
        lines.append(f"add chain inet {table} {chain}" + (f" {{ {hook} }}" if hook else ""))
        lines.append(f"flush chain inet {table} {chain}")
    for chain in (*TUNNEL_CHAINS, OUTSIDE_CHAIN):
        lines += [f"add rule inet {table} {chain} {rule}" for rule in rules[chain]]
    return "\n".join(lines) + "\n"


def removed_chains(table: str, chains: Sequence[str]) -> list[str]:
    """Script lines that remove ``chains`` (what an older version had) from ``table``, whether
    they are there or not: each is added first, since deleting one never there is an error,
    and flushed, since a chain with rules cannot be deleted on every kernel."""
    return [f"{verb} chain inet {table} {c}" for c in chains for verb in ("add", "flush", "delete")]


def load_tunnel(
    table: str,
    uplink: str,
    device: str,
    port: int,
    dns_redirect: Sequence[tuple[IPAddress, int]] = (),
    netns: str | None = None,
) -> None:
    """Add or replace the tunnel chains in the gateway's table, keeping the sets' elements."""
    script = render_tunnel(table, uplink, device, port, dns_redirect)
    found = listing(table, netns)
    if found is None:
        raise SkeletonError(f"table {table} does not exist: load the gateway skeleton first")
    script += "".join(f"{line}\n" for line in removed_chains(table, STALE_TUNNEL_CHAINS))
    run_script(script, f"the tunnel chains of table {table}", netns)


def unload_tunnel(table: str, netns: str | None = None) -> bool:
    """Remove the tunnel chains and sets from the gateway's table; False if there were none."""
    found = listing(table, netns)
    if found is None:
        return False
    chains = [c for c in (*TUNNEL_CHAINS, *STALE_TUNNEL_CHAINS) if c in found["chain"]]
    sets = [s for s in TUNNEL_SET_SPECS if s in found["set"]]
    if not chains and not sets:
        return False
    lines = [f"flush chain inet {table} {OUTSIDE_CHAIN}"] if OUTSIDE_CHAIN in found["chain"] else []
    lines += [f"flush chain inet {table} {c}" for c in chains]
    lines += [f"delete chain inet {table} {c}" for c in chains]
    lines += [f"delete set inet {table} {s}" for s in sets]
    run_script("\n".join(lines) + "\n", f"removing the tunnel chains of table {table}", netns)
    return True
