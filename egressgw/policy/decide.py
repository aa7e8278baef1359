"""Decisions: may this workload reach this address or name? A verdict with an exact reason.

In: a ``WorkloadSelection`` (its gateway and policies) and one destination. Out: a ``Decision``
whose reason a user can read in a log line and a test can assert. Pure: no I/O, no clock.

Semantics:

- no gateway selects the workload: DENY;
- when an Enforce policy selects the workload, only Enforce policies decide (Audit policies
  are ignored); when only Audit policies select it, they decide, and what they would deny
  becomes AUDIT (allowed, logged and counted). This lets a project try a new policy in Audit
  mode first, and never lets an Audit policy loosen or tighten an enforced workload;
- Deny rules win over Allow rules, across all deciding policies; among rules of the same action
  the first by (policy name, rule index) is named;
- a rule matches when one of its peers matches (fqdn exact, fqdnPattern, cidr contains the
  address) and its ports match (no ports: every port and protocol; a port entry without port:
  every port of its protocol; endPort is inclusive);
- no rule matches: the gateway's defaultAction decides.

``decide_name`` with ``port=None`` asks "may this name be resolved at all", as the DNS
interceptor does: an Allow rule matches if it allows the name on any port (of ``protocol``, if
given); a Deny rule matches only if it denies every port (of ``protocol``, if given).
Addresses match cidr peers only; fqdn peers reach addresses through DNS answers, which the
datapath tracks per workload.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from egressgw.policy.fqdn import InvalidName, canonical_name, compile_pattern
from egressgw.policy.model import (
    Action,
    EgressPolicy,
    EgressRule,
    IPAddress,
    Mode,
    Peer,
    PortSpec,
    Protocol,
    RuleRef,
)
from egressgw.policy.select import WorkloadSelection

NO_GATEWAY = "no EgressGateway selects this workload"


class Verdict(enum.StrEnum):
    ALLOW = "Allow"
    DENY = "Deny"
    AUDIT = "Audit"  # would be denied, but allowed because the deciding policies are in Audit mode


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str
    rule: RuleRef | None = None

    @property
    def allowed(self) -> bool:
        """Whether the traffic may pass (ALLOW and AUDIT both pass)."""
        return self.verdict is not Verdict.DENY


def deciding_policies(policies: Sequence[EgressPolicy]) -> tuple[tuple[EgressPolicy, ...], bool]:
    """The policies whose rules decide, and whether would-deny becomes AUDIT."""
    enforcing = tuple(p for p in policies if p.mode is Mode.ENFORCE)
    if enforcing:
        return enforcing, False
    return tuple(policies), bool(policies)


def _ports_match(
    ports: Sequence[PortSpec], protocol: Protocol | None, port: int | None, action: Action
) -> bool:
    if not ports:
        return True
    # With no protocol or port, the question is about some traffic (Allow) or all of it (Deny).
    for spec in ports:
        if protocol is None:
            if action is Action.ALLOW:
                return True
            continue
        if spec.protocol is not protocol:
            continue
        if port is None:
            if action is Action.ALLOW or spec.port is None:
                return True
            continue
        first, last = spec.port_range
        if first <= port <= last:
            return True
    return False


def _describe(peer: Peer) -> str:
    if peer.fqdn is not None:
        return f'fqdn "{peer.fqdn}"'
    if peer.fqdn_pattern is not None:
        return f'fqdnPattern "{peer.fqdn_pattern}"'
    return f"cidr {peer.cidr}"


def _traffic(protocol: Protocol | None, port: int | None) -> str:
    if protocol is None:
        return "any port"
    return f"{protocol}/{port}" if port is not None else f"{protocol}"


@dataclass(frozen=True)
class _Match:
    rule: EgressRule
    ref: RuleRef
    peer: Peer
    ports_match: bool


def _rules(policies: Sequence[EgressPolicy]) -> Iterator[tuple[EgressRule, RuleRef]]:
    for policy in sorted(policies, key=lambda p: (p.namespace, p.name)):
        for index, rule in enumerate(policy.egress):
            yield rule, RuleRef(policy.namespace, policy.name, index)


def _decide(
    workload: WorkloadSelection,
    subject: str,
    matches: Iterator[_Match],
    protocol: Protocol | None,
    port: int | None,
) -> Decision:
    gateway = workload.gateway
    assert gateway is not None
    _, audit = deciding_policies(workload.policies)
    allow: _Match | None = None
    near_miss: _Match | None = None  # an Allow peer matched, its ports did not
    for match in matches:
        action = match.rule.action
        if action is Action.DENY and match.ports_match:
            reason = f"{subject} matched {_describe(match.peer)} in Deny rule {match.ref}"
            if audit:
                return Decision(Verdict.AUDIT, f"Audit mode, would be denied: {reason}", match.ref)
            return Decision(Verdict.DENY, reason, match.ref)
        if action is Action.ALLOW and match.ports_match and allow is None:
            allow = match
        elif action is Action.ALLOW and not match.ports_match and near_miss is None:
            near_miss = match
    if allow is not None:
        reason = f"{subject} matched {_describe(allow.peer)} in Allow rule {allow.ref}"
        return Decision(Verdict.ALLOW, reason, allow.ref)

    default = f'EgressGateway "{gateway.name}" defaultAction is {gateway.default_action}'
    if near_miss is not None:
        why = (
            f"{subject} matched {_describe(near_miss.peer)} in Allow rule {near_miss.ref}"
            f" but not its ports ({_traffic(protocol, port)})"
        )
    elif not workload.policies:
        why = "no EgressPolicy selects this workload"
    else:
        why = "no rule matches"
    reason = f"{why}; {default}"
    if gateway.default_action is Action.ALLOW:
        return Decision(Verdict.ALLOW, reason)
    if audit:
        return Decision(Verdict.AUDIT, f"Audit mode, would be denied: {reason}")
    return Decision(Verdict.DENY, reason)


def _check_query(protocol: Protocol | None, port: int | None) -> None:
    if port is not None and protocol is None:
        raise ValueError("a port needs a protocol")
    if port is not None and not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0..65535")


def decide_address(
    workload: WorkloadSelection, address: IPAddress | str, protocol: Protocol, port: int
) -> Decision:
    """May ``workload`` connect to ``address`` with ``protocol``/``port``? (cidr peers only)"""
    _check_query(protocol, port)
    if workload.gateway is None:
        return Decision(Verdict.DENY, NO_GATEWAY)
    target = ipaddress.ip_address(address)
    policies, _ = deciding_policies(workload.policies)

    def matches() -> Iterator[_Match]:
        for rule, ref in _rules(policies):
            for peer in rule.to:
                if peer.cidr is not None and target in peer.cidr:
                    yield _Match(
                        rule, ref, peer, _ports_match(rule.ports, protocol, port, rule.action)
                    )
                    break

    return _decide(workload, "address", matches(), protocol, port)


def name_matches(peer: Peer, canonical: str) -> bool:
    """Whether ``peer`` names ``canonical`` (a name already passed through ``canonical_name``)."""
    if peer.fqdn is not None:
        return peer.fqdn == canonical
    if peer.fqdn_pattern is not None:
        return compile_pattern(peer.fqdn_pattern).matches(canonical)
    return False


def decide_name(
    workload: WorkloadSelection,
    name: str,
    protocol: Protocol | None = None,
    port: int | None = None,
) -> Decision:
    """May ``workload`` reach ``name`` (on ``protocol``/``port``, or on any port if None)?"""
    _check_query(protocol, port)
    if workload.gateway is None:
        return Decision(Verdict.DENY, NO_GATEWAY)
    try:
        canonical = canonical_name(name)
    except InvalidName as exc:
        return Decision(Verdict.DENY, f"not a valid DNS name: {exc}")
    policies, _ = deciding_policies(workload.policies)

    def matches() -> Iterator[_Match]:
        for rule, ref in _rules(policies):
            for peer in rule.to:
                if name_matches(peer, canonical):
                    yield _Match(
                        rule, ref, peer, _ports_match(rule.ports, protocol, port, rule.action)
                    )
                    break

    return _decide(workload, "name", matches(), protocol, port)
