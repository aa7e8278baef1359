"""``egressgw policy check PATH...``: validate manifests and say what is wrong.

In: files and directories of manifests, and optionally ``conflicts``: what the daemon would note
about the valid objects taken together (two gateways selecting the same pods, an address claimed
by two pods, an egress IP in two gateways; the command line hands in ``plan.build``'s notes, as
this layer may not import the plan). Out: one line per problem (see ``Problem.__str__``), one
line per conflict (``warning:``, or ``error:`` with ``strict``), and a summary line on ``out``.
Exit status 1 if anything is wrong, nothing was found, or (``strict``) there is a conflict;
else 0.

The Nodes are checked here too (``node_conflicts``), as conflicts: once the manifests describe
Nodes, a pod on a Node they do not list, a gateway whose nodeSelector matches no Node, a Node
without an InternalIP and two Nodes sharing one would each leave traffic with nowhere to go.
Without any Node (a single gateway that holds every egress IP) none of this is said.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TextIO

from egressgw.policy.load import load_paths
from egressgw.policy.model import IPAddress, Snapshot

Conflicts = Callable[[Snapshot], Sequence[str]]


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def node_conflicts(snapshot: Snapshot) -> list[str]:
    """What the Nodes of ``snapshot`` leave unreachable, one line each; nothing without Nodes."""
    if not snapshot.nodes:
        return []
    notes: list[str] = []
    names = {node.name for node in snapshot.nodes}
    for pod in snapshot.pods:
        if pod.node_name and pod.node_name not in names:
            notes.append(
                f"Pod {pod.namespace}/{pod.name}: spec.nodeName {pod.node_name} names no Node"
                " in the manifests: add that Node, or fix the name"
            )
    for gateway in sorted(snapshot.gateways, key=lambda g: g.name):
        selector = gateway.node_selector
        if not gateway.egress_ips or selector is None:
            continue
        if not any(selector.matches(node.labels) for node in snapshot.nodes):
            ips = ", ".join(str(ip) for ip in gateway.egress_ips)
            notes.append(
                f"EgressGateway {gateway.name}: spec.nodeSelector matches no Node, so no node"
                f" holds {ips} and the traffic of its pods is dropped: label a Node to match"
            )
    sharing: dict[IPAddress, list[str]] = defaultdict(list)
    for node in snapshot.nodes:
        if not node.addresses:
            notes.append(
                f"Node {node.name}: status.addresses has no InternalIP, so the tunnel cannot"
                " reach it: add the address other nodes reach it at"
            )
        for address in node.addresses:
            sharing[address].append(node.name)
    for address, nodes in sorted(sharing.items(), key=lambda i: (i[0].version, i[0])):
        if len(nodes) > 1:
            notes.append(
                f"Nodes {', '.join(nodes)} share the InternalIP {address}: the tunnel cannot"
                " tell them apart; give each Node its own address"
            )
    return notes


def check_paths(
    paths: Sequence[str],
    out: TextIO | None = None,
    *,
    strict: bool = False,
    conflicts: Conflicts | None = None,
) -> int:
    out = out or sys.stdout
    result = load_paths(paths)
    for problem in result.problems:
        print(problem, file=out)
    where = ", ".join(str(p) for p in paths)
    noted: list[str] = []
    if result.files:
        if conflicts is not None:
            noted.extend(conflicts(result.snapshot))
        noted.extend(node_conflicts(result.snapshot))
    severity = "error" if strict else "warning"
    for note in noted:
        print(f"{where}: {severity}: {note}", file=out)
    loaded = sum(result.files.values())
    if not result.files and not result.problems:
        # a typo in the path is likelier than an intentionally empty directory
        print(f"{where}: no *.yaml or *.yml files found", file=out)
        return 1
    counts = []
    if result.problems:
        counts.append(_plural(len(result.problems), "problem"))
    if noted:
        counts.append(_plural(len(noted), "conflict") + ("" if strict else " (warnings)"))
    if not result.problems:
        summary = f"{_plural(loaded, 'object')}, all valid"
    else:
        summary = _plural(loaded, "valid object")
    print(f"{where}: {', '.join([summary, *counts])}", file=out)
    return 1 if result.problems or (strict and noted) else 0
