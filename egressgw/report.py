"""Egress IPs per gateway: what an external firewall must allow for each project.

In: a Snapshot (from manifests or the running daemon's last one) and, from the daemon, which
egress IPs the node asked holds and which node holds each one, as far as it knows. Out:
``GatewayEgress`` rows, and the same rows as a table, JSON or CSV. JSON is also what
``/v1/egress-ips`` serves, so ``egressgw egress-ips --url`` reads it back with ``from_json`` and
prints it the same way. Pure: no I/O.

A gateway's namespaces are those whose labels match its namespaceSelector, among the Namespaces
of the snapshot and the namespaces of its pods; a podSelector may narrow that to some pods.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from egressgw.policy.model import EgressGateway, IPAddress, Snapshot
from egressgw.policy.select import namespace_labels

FORMATS = ("table", "json", "csv")
HeldBy = Callable[[EgressGateway, IPAddress], bool]


@dataclass(frozen=True)
class EgressIP:
    address: str
    family: int  # 4 or 6
    held: bool | None = None  # whether the node asked holds it; None: not known (manifests)
    node: str | None = None  # the node that holds it; None: not known (or nobody holds it)


@dataclass(frozen=True)
class GatewayEgress:
    gateway: str
    namespaces: tuple[str, ...]
    egress_ips: tuple[EgressIP, ...]
    default_action: str
    selects_some_pods: bool = False  # a podSelector narrows the namespaces to some of their pods


def gateway_egress(
    snapshot: Snapshot,
    held: HeldBy | None = None,
    *,
    holders: Mapping[IPAddress, str] | None = None,
) -> list[GatewayEgress]:
    """Every gateway of ``snapshot``, sorted by name, with its namespaces and egress IPs.

    ``held`` says whether the node asked holds an address; ``holders`` names the node that
    holds each address, for those whose holder is known (the node asked, or another one).
    """
    known = holders or {}
    namespaces = sorted(set(snapshot.namespaces) | {p.namespace for p in snapshot.pods})
    labels = {ns: namespace_labels(snapshot, ns) for ns in namespaces}
    rows = []
    for gateway in sorted(snapshot.gateways, key=lambda g: g.name):
        selected = tuple(ns for ns in namespaces if gateway.namespace_selector.matches(labels[ns]))
        ips = tuple(
            EgressIP(
                str(address),
                address.version,
                held(gateway, address) if held is not None else None,
                known.get(address),
            )
            for address in gateway.egress_ips
        )
        narrowed = bool(gateway.pod_selector.match_labels or gateway.pod_selector.match_expressions)
        rows.append(
            GatewayEgress(gateway.name, selected, ips, str(gateway.default_action), narrowed)
        )
    return rows


# -- JSON (also the /v1/egress-ips body) -----------------------------------------------------


def to_json(rows: Sequence[GatewayEgress]) -> dict[str, Any]:
    return {
        "gateways": [
            {
                "gateway": r.gateway,
                "namespaces": list(r.namespaces),
                "defaultAction": r.default_action,
                "selectsSomePods": r.selects_some_pods,
                "egressIPs": [
                    {"address": ip.address, "family": ip.family, "held": ip.held, "node": ip.node}
                    for ip in r.egress_ips
                ],
            }
            for r in rows
        ]
    }


def from_json(body: Mapping[str, Any]) -> list[GatewayEgress]:
    """Rows from a ``to_json`` body; KeyError/TypeError/ValueError if it is not one."""
    return [
        GatewayEgress(
            str(g["gateway"]),
            tuple(str(n) for n in g["namespaces"]),
            tuple(
                EgressIP(str(i["address"]), int(i["family"]), i.get("held"), i.get("node"))
                for i in g["egressIPs"]
            ),
            str(g["defaultAction"]),
            bool(g.get("selectsSomePods", False)),
        )
        for g in body["gateways"]
    ]


# -- table and CSV: one line per (gateway, egress IP) ----------------------------------------

COLUMNS = ("gateway", "namespaces", "egress_ip", "family", "held", "node")


def _held(ip: EgressIP) -> str:
    return "unknown" if ip.held is None else ("yes" if ip.held else "no")


def _lines(rows: Iterable[GatewayEgress]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for r in rows:
        namespaces = " ".join(r.namespaces) + (" (some pods)" if r.selects_some_pods else "")
        for ip in r.egress_ips or (EgressIP("-", 0),):
            family = f"IPv{ip.family}" if ip.family else "-"
            node = ip.node or "-"
            out.append((r.gateway, namespaces or "-", ip.address, family, _held(ip), node))
    return out


def format_rows(rows: Sequence[GatewayEgress], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(to_json(rows), indent=2) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(_lines(rows))
        return buffer.getvalue()
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    header = tuple(c.upper().replace("_", " ") for c in COLUMNS)
    lines = [header, *_lines(rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() + "\n"
        for line in lines
    )
