"""The constant ruleset: one ``inet`` table whose rules never change with workloads or policies.

In: the table name and the uplink interface. Out: an nft script that creates what is missing and
atomically replaces the rules of the chains, keeping every set and its elements (adoption): it uses
``add`` for the table and sets and never flushes a set. Loaded at start (and on upgrade) by
``nft -f -`` as one transaction; everything that varies afterwards is a set or map element.

Per packet leaving through the uplink on a new flow:
  workload address -> identity (a meta mark), unknown source -> reject;
  identity without an egress IP held here -> drop (never masqueraded to the node address);
  (identity . daddr . proto . dport) in a Deny set -> reject (or log and accept in Audit);
  ... in an Allow set (learned names with timeouts, CIDR rules without) -> accept;
  identity with defaultAction Allow -> accept; Audit identity -> log, count, accept; else reject.
  An accepted flow keeps its identity in ct mark, so later packets are counted per identity
  (``acct_accepted``); rejected and dropped first packets count in ``acct_rejected``.
  postrouting: SNAT to the identity's egress IP of the packet's family.
Reject is ICMP admin-prohibited so a client fails at once ("No route to host").
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from egressgw.datapath.netns import command

SKELETON_VERSION = 2
FAMILIES = (4, 6)
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")


@dataclass(frozen=True)
class SetSpec:
    name: str
    key_type: str
    data_type: str | None = None
    flags: tuple[str, ...] = ()
    counter: bool = False  # every element gets its own packet and byte counter

    def declaration(self, table: str) -> str:
        kind = "map" if self.data_type else "set"
        typ = f"{self.key_type} : {self.data_type}" if self.data_type else self.key_type
        flags = f" flags {','.join(self.flags)};" if self.flags else ""
        counter = " counter;" if self.counter else ""
        return f"add {kind} inet {table} {self.name} {{ type {typ};{flags}{counter} }}"


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
        f'oifname != "{uplink}" return',
        # established packets of a workload's flow are counted under the identity kept in ct mark
        "ct state established,related ct mark @acct_accepted accept",
        "ct state established,related accept",
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


def load(table: str, uplink: str, netns: str | None = None) -> None:
    """Create or upgrade the skeleton in a network namespace (None: this one), one transaction."""
    script = render(table, uplink)
    argv = command(netns, ["nft", "-f", "-"])
    proc = subprocess.run(argv, input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SkeletonError(f"nft refused the ruleset of table {table}: {proc.stderr.strip()}")
