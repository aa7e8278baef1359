"""Per-identity name decisions, and which ports an allowed name opens.

In: each identity's gateway and policies (from the plan). Out: for (identity, name) a
``NameDecision``: the policy layer's verdict and reason, and the (protocol, port range) atoms to
program for the answer's addresses. Decisions are memoised per plan; a new plan means a new
``NamePolicy``. Pure: no I/O, no clock.

A decision depends on the name only through which of the identity's ``fqdn`` and
``fqdnPattern`` peers match it, so it is worked out once per identity and set of matching peers:
a name nobody asked for before costs its canonical form and a lookup of its matching peers.

Port ranges are split into atoms on every range boundary of the identity's rules, so two
programmed ranges of one identity are either equal or disjoint: interval sets refuse overlaps.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from egressgw.policy.decide import Decision, Verdict, decide_name, deciding_policies, name_matches
from egressgw.policy.fqdn import FqdnMatcher, InvalidName, InvalidPattern, canonical_name
from egressgw.policy.model import Action, EgressPolicy, PortSpec
from egressgw.policy.select import WorkloadSelection

PortAtom = tuple[int | None, int, int]  # (protocol or None for every protocol, first, last)
ANY: PortAtom = (None, 0, 65535)


@dataclass(frozen=True, slots=True)
class NameDecision:
    decision: Decision
    ports: tuple[PortAtom, ...] = ()  # what to program; empty: nothing to program

    @property
    def allowed(self) -> bool:
        return self.decision.allowed


def _spec_atoms(specs: Iterable[PortSpec]) -> list[PortAtom]:
    specs = list(specs)
    if not specs:
        return [ANY]
    return [(s.protocol.number, *s.port_range) for s in specs]


def _boundaries(policies: Iterable[EgressPolicy]) -> dict[int | None, set[int]]:
    """Where the identity's port ranges start and end, per protocol."""
    cuts: dict[int | None, set[int]] = {}
    for policy in policies:
        for rule in policy.egress:
            if rule.action is not Action.ALLOW:
                continue
            for proto, lo, hi in _spec_atoms(rule.ports):
                if lo != hi:
                    cuts.setdefault(proto, set()).update((lo, hi + 1))
    return cuts


def atomize(atoms: Iterable[PortAtom], cuts: Mapping[int | None, set[int]]) -> tuple[PortAtom, ...]:
    out: set[PortAtom] = set()
    for proto, lo, hi in atoms:
        if lo == hi or proto is None:
            out.add((proto, lo, hi))
            continue
        edges = sorted({lo, hi + 1} | {c for c in cuts.get(proto, ()) if lo < c <= hi})
        out.update((proto, a, b - 1) for a, b in itertools.pairwise(edges))
    return tuple(sorted(out, key=lambda a: (a[0] if a[0] is not None else -1, a[1], a[2])))


class _Peers:
    """An identity's ``fqdn`` and ``fqdnPattern`` peers, to say which match a canonical name."""

    def __init__(self, policies: Iterable[EgressPolicy]) -> None:
        self.exact: set[str] = set()
        self.patterns: FqdnMatcher[str] = FqdnMatcher()
        added: set[str] = set()
        for policy in policies:
            for rule in policy.egress:
                for peer in rule.to:
                    if peer.fqdn is not None:
                        self.exact.add(peer.fqdn)
                    elif peer.fqdn_pattern is not None and peer.fqdn_pattern not in added:
                        added.add(peer.fqdn_pattern)
                        self.patterns.add_pattern(peer.fqdn_pattern, peer.fqdn_pattern)

    def matching(self, canonical: str) -> tuple[str | None, frozenset[str]]:
        exact = canonical if canonical in self.exact else None
        return exact, frozenset(self.patterns.match_canonical(canonical))


class NamePolicy:
    def __init__(self, identities: Mapping[int, WorkloadSelection], cache_size: int = 100_000):
        self._identities = identities
        self._cuts = {
            identity: _boundaries(deciding_policies(sel.policies)[0])
            for identity, sel in identities.items()
        }
        self._cache_size = cache_size
        self._cache: dict[tuple[int, str], NameDecision] = {}  # emptied when full
        # Names under one pattern share one decision object: unique names then leave nothing
        # behind for the collector but the cache's key.
        self._decisions: dict[NameDecision, NameDecision] = {}
        self._peers: dict[int, _Peers | None] = {}  # None: some pattern does not compile
        self._by_peers: dict[tuple[int, str | None, frozenset[str]], NameDecision] = {}

    def decide(self, identity: int, name: str) -> NameDecision:
        key = (identity, name)
        found = self._cache.get(key)
        if found is None:
            found = self._decide(identity, name)
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
                self._decisions.clear()
                self._by_peers.clear()
            found = self._decisions.setdefault(found, found)
            self._cache[key] = found
        return found

    def _decide(self, identity: int, name: str) -> NameDecision:
        selection = self._identities.get(identity)
        if selection is None:
            return NameDecision(Decision(Verdict.DENY, "unknown workload identity"))
        try:
            canonical = canonical_name(name)
        except InvalidName:
            return self._work_out(identity, selection, name)  # the reason quotes the name
        if identity not in self._peers:
            try:
                self._peers[identity] = _Peers(deciding_policies(selection.policies)[0])
            except InvalidPattern:
                self._peers[identity] = None  # decide_name reports it, name by name
        peers = self._peers[identity]
        if peers is None:
            return self._work_out(identity, selection, canonical)
        key = (identity, *peers.matching(canonical))
        found = self._by_peers.get(key)
        if found is None:
            found = self._by_peers[key] = self._work_out(identity, selection, canonical)
        return found

    def _work_out(self, identity: int, selection: WorkloadSelection, name: str) -> NameDecision:
        decision = decide_name(selection, name)
        if decision.verdict is not Verdict.ALLOW or decision.rule is None:
            # denied; or allowed by the gateway's default or in Audit mode, which the datapath
            # accepts without per-destination elements
            return NameDecision(decision)
        try:
            canonical = canonical_name(name)
        except InvalidName:
            return NameDecision(decision)
        policies, _ = deciding_policies(selection.policies)
        atoms: list[PortAtom] = []
        for policy in policies:
            for rule in policy.egress:
                if rule.action is Action.ALLOW and any(name_matches(p, canonical) for p in rule.to):
                    atoms.extend(_spec_atoms(rule.ports))
        if any(a == ANY for a in atoms):
            return NameDecision(decision, (ANY,))
        return NameDecision(decision, atomize(atoms, self._cuts.get(identity, {})))
