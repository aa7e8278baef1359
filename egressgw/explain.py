"""Why is (or would be) this connection allowed or blocked?

In: a Snapshot (from manifests, or the running daemon's last one) and a ``Query``: a workload
(namespace and pod name or pod IP) and a destination (a DNS name or an address, optionally a
port and protocol). Out: an ``Explanation``: the verdict, the exact reason and rule of
``policy.decide``, and the context an operator needs (gateway, egress IPs, deciding policies).
Pure: no I/O. It answers what the policies say; it does not look at the kernel.

A workload that does not exist raises ``UnknownWorkload`` with a message that says what was
looked for and what exists instead; a malformed query raises ``ValueError``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from egressgw.policy.decide import Decision, Verdict, decide_address, decide_name, deciding_policies
from egressgw.policy.model import EgressPolicy, Pod, Protocol, Snapshot
from egressgw.policy.select import WorkloadSelection, index_workloads, select_workload

EXIT_ALLOWED, EXIT_DENIED, EXIT_ERROR = 0, 1, 2


class UnknownWorkload(LookupError):
    """No pod matches the query's workload; the message says what exists instead."""


@dataclass(frozen=True)
class Query:
    namespace: str
    pod: str | None = None
    ip: str | None = None
    host: str | None = None
    address: str | None = None
    port: int | None = None
    protocol: str | None = None

    def __post_init__(self) -> None:
        if not self.namespace:
            raise ValueError("a namespace is needed")
        if (self.pod is None) == (self.ip is None):
            raise ValueError("give exactly one of pod and ip")
        if (self.host is None) == (self.address is None):
            raise ValueError("give exactly one of host and address")
        if self.ip is not None:
            _address("ip", self.ip)
        if self.address is not None:
            _address("address", self.address)
            if self.port is None:
                raise ValueError("an address needs a port: addresses are allowed per port")
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range 0..65535")
        if self.protocol is not None:
            self.protocol_enum()

    def protocol_enum(self) -> Protocol | None:
        """The protocol; TCP when only a port is given."""
        if self.protocol is None:
            return Protocol.TCP if self.port is not None else None
        try:
            return Protocol(self.protocol.upper())
        except ValueError:
            raise ValueError(
                f"protocol {self.protocol!r} is not one of {', '.join(p.value for p in Protocol)}"
            ) from None

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> Query:
        """From URL query parameters (``/v1/explain?namespace=..&pod=..&host=..``)."""
        known = {"namespace", "pod", "ip", "host", "address", "port", "protocol"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown parameter {unknown[0]!r}; known: {', '.join(sorted(known))}")
        port_text = params.get("port")
        if port_text is not None and not (port_text.isascii() and port_text.isdigit()):
            raise ValueError(f"port must be a number, got {port_text!r}")
        return cls(
            namespace=params.get("namespace", ""),
            pod=params.get("pod"),
            ip=params.get("ip"),
            host=params.get("host"),
            address=params.get("address"),
            port=int(port_text) if port_text is not None else None,
            protocol=params.get("protocol"),
        )

    def to_params(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items() if v is not None}


def _address(what: str, text: str) -> None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an IP address") from None


@dataclass(frozen=True)
class Explanation:
    verdict: str  # Allow, Deny or Audit (allowed, logged as would-be denied)
    reason: str
    rule: str | None  # "namespace/policy#index", None when the default action decided
    namespace: str
    pod: str
    pod_ips: tuple[str, ...]
    destination: str  # 'name "db.example.com" on TCP/5432'
    gateway: str | None
    egress_ips: tuple[str, ...] = ()
    policies: tuple[str, ...] = ()  # "name (Mode)" of the policies selecting the pod
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def allowed(self) -> bool:
        return self.verdict != Verdict.DENY.value

    @property
    def exit_code(self) -> int:
        return EXIT_ALLOWED if self.allowed else EXIT_DENIED

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        for key in ("pod_ips", "egress_ips", "policies", "notes"):
            body[key] = list(body[key])
        return body

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Explanation:
        return cls(
            verdict=str(body["verdict"]),
            reason=str(body["reason"]),
            rule=body.get("rule"),
            namespace=str(body["namespace"]),
            pod=str(body["pod"]),
            pod_ips=tuple(body.get("pod_ips", ())),
            destination=str(body["destination"]),
            gateway=body.get("gateway"),
            egress_ips=tuple(body.get("egress_ips", ())),
            policies=tuple(body.get("policies", ())),
            notes=tuple(body.get("notes", ())),
        )

    def text(self) -> str:
        rows = [
            ("verdict", self.verdict),
            ("reason", self.reason),
            ("rule", self.rule or "-"),
            ("workload", f"{self.namespace}/{self.pod} ({', '.join(self.pod_ips) or 'no IPs'})"),
            ("to", self.destination),
            ("gateway", self.gateway or "- (none selects this workload)"),
            ("egress IPs", ", ".join(self.egress_ips) or "-"),
            ("policies", ", ".join(self.policies) or "- (none select this workload)"),
        ]
        rows += [("note", note) for note in self.notes]
        return "".join(f"{key + ':':<12}{value}\n" for key, value in rows)


def find_workload(snapshot: Snapshot, query: Query) -> WorkloadSelection:
    """The pod the query names, with what selects it; ``UnknownWorkload`` if there is none."""
    in_namespace = [p for p in snapshot.pods if p.namespace == query.namespace]
    if query.pod is not None:
        for pod in in_namespace:
            if pod.name == query.pod:
                return select_workload(snapshot, pod)
        raise UnknownWorkload(
            f"no pod {query.pod!r} in namespace {query.namespace!r}{_known(in_namespace)}"
        )
    assert query.ip is not None
    address = ipaddress.ip_address(query.ip)
    index = index_workloads(snapshot)
    for conflict in index.address_conflicts:
        if conflict.address == address:
            raise UnknownWorkload(
                f"{address} is claimed by pods {', '.join(conflict.pods)}; it belongs to none "
                "of them, and the gateway rejects its traffic"
            )
    found = index.lookup(address)
    if found is None:
        raise UnknownWorkload(
            f"no pod has IP {address}; the gateway rejects traffic from addresses that are not "
            "workloads"
        )
    if found.pod.namespace != query.namespace:
        raise UnknownWorkload(
            f"{address} is pod {found.pod.namespace}/{found.pod.name}, not in namespace "
            f"{query.namespace!r}"
        )
    return found


def _known(pods: list[Pod]) -> str:
    if not pods:
        return " (no pods are known in that namespace)"
    names = sorted(p.name for p in pods)
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    return f" (pods there: {', '.join(names[:10])}{more})"


def explain(snapshot: Snapshot, query: Query) -> Explanation:
    selection = find_workload(snapshot, query)
    protocol = query.protocol_enum()
    ports = f"{protocol}/{query.port}" if query.port is not None else (protocol or "any port")
    decision: Decision
    if query.host is not None:
        decision = decide_name(selection, query.host, protocol, query.port)
        destination = f'name "{query.host}" on {ports}'
    else:
        assert query.address is not None and query.port is not None and protocol is not None
        decision = decide_address(selection, query.address, protocol, query.port)
        destination = f"address {query.address} on {ports}"
    return _explanation(selection, query, decision, destination)


def _explanation(
    selection: WorkloadSelection, query: Query, decision: Decision, destination: str
) -> Explanation:
    gateway = selection.gateway
    notes: list[str] = []
    deciding, _audit = deciding_policies(selection.policies)
    if decision.verdict is Verdict.AUDIT:
        notes.append("Audit mode: the traffic passes and is logged and counted as would-be denied")
    if query.address is not None and decision.verdict is Verdict.DENY and _has_names(deciding):
        notes.append(
            "addresses are checked against cidr rules only; a destination allowed by name opens "
            "for this workload once it resolves that name through the gateway"
        )
    if query.host is not None and query.port is None and decision.verdict is Verdict.ALLOW:
        notes.append("the name may be resolved; connections need a port that the rule allows")
    if selection.conflicts and gateway is not None:
        notes.append(
            f"also selected by EgressGateways {', '.join(selection.conflicts)}; "
            f"{gateway.name} wins (lowest name)"
        )
    modes = {p.name: p.mode for p in selection.policies}
    return Explanation(
        verdict=decision.verdict.value,
        reason=decision.reason,
        rule=str(decision.rule) if decision.rule else None,
        namespace=selection.pod.namespace,
        pod=selection.pod.name,
        pod_ips=tuple(str(a) for a in selection.pod.ips),
        destination=destination,
        gateway=gateway.name if gateway else None,
        egress_ips=tuple(str(a) for a in gateway.egress_ips) if gateway else (),
        policies=tuple(f"{name} ({mode})" for name, mode in modes.items()),
        notes=tuple(notes),
    )


def _has_names(policies: tuple[EgressPolicy, ...]) -> bool:
    return any(
        peer.fqdn is not None or peer.fqdn_pattern is not None
        for policy in policies
        for rule in policy.egress
        for peer in rule.to
    )
