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
A Deny rule that names a name with ports carves those ports out of what its Allow rules open
(an Allow rule without ports then opens every port of TCP, UDP and SCTP but those), so the
kernel never accepts what the Deny rule names.

``ports_of`` is what the datapath asks when it re-decides learned elements under a new plan.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from egressgw.datapath.state import ANY_ATOM, PortAtom, atom_order
from egressgw.policy.decide import Decision, Verdict, decide_name, deciding_policies, name_matches
from egressgw.policy.fqdn import FqdnMatcher, InvalidName, InvalidPattern, canonical_name
from egressgw.policy.model import Action, EgressPolicy, PortSpec, Protocol
from egressgw.policy.select import WorkloadSelection

ANY = ANY_ATOM
# what "every port" becomes once a Deny rule carves ports out of it
_EVERY_PORT_OF_EACH = tuple((p.number, 0, 65535) for p in Protocol)


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
    """Where the identity's port ranges start and end, per protocol (a Deny rule's single
    ports too: an allowed range is cut around them)."""
    cuts: dict[int | None, set[int]] = {}
    for policy in policies:
        for rule in policy.egress:
            for proto, lo, hi in _spec_atoms(rule.ports):
                if lo != hi or rule.action is Action.DENY:
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
    return tuple(sorted(out, key=atom_order))


def _within(atom: PortAtom, deny: PortAtom) -> bool:
    return atom[0] == deny[0] and deny[1] <= atom[1] and atom[2] <= deny[2]


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
        # decisions by (identity, name) in two generations: ``forget_unused`` (or a full
        # ``_cache``) makes the young one old, and a name asked again moves back; a name not
        # asked for a whole generation is forgotten, so a flood of one-off names leaves nothing
        self._cache: dict[tuple[int, str], NameDecision] = {}
        self._older: dict[tuple[int, str], NameDecision] = {}
        # Names under one pattern share one decision object: unique names then leave nothing
        # behind for the collector but the cache's key.
        self._decisions: dict[NameDecision, NameDecision] = {}
        self._peers: dict[int, _Peers | None] = {}  # None: some pattern does not compile
        self._by_peers: dict[tuple[int, str | None, frozenset[str]], NameDecision] = {}

    @property
    def identities(self) -> Mapping[int, WorkloadSelection]:
        return self._identities

    def decides_alike(self, identity: int, other: object) -> bool:
        """Whether ``other`` decides every name of ``identity`` as this plan does: the same
        gateway and the same policies (what the decisions and port atoms depend on)."""
        if not isinstance(other, NamePolicy):
            return False
        mine, theirs = self._identities.get(identity), other._identities.get(identity)
        if mine is None or theirs is None:
            return False
        return mine.gateway == theirs.gateway and mine.policies == theirs.policies

    def ports_of(self, identity: int, name: str) -> tuple[PortAtom, ...]:
        """The port atoms an answer for ``name`` opens for ``identity`` under this plan."""
        return self.decide(identity, name).ports

    def decide(self, identity: int, name: str) -> NameDecision:
        key = (identity, name)
        found = self._cache.get(key)
        if found is None:
            found = self._older.pop(key, None)
            if found is None:
                decided = self._decide(identity, name)
                found = self._decisions.setdefault(decided, decided)
            if len(self._cache) >= self._cache_size:
                self.forget_unused()
            self._cache[key] = found
        return found

    def forget_unused(self) -> None:
        """Start a new generation of remembered decisions: those not asked for since the last
        call are dropped."""
        self._older, self._cache = self._cache, {}
        self._decisions.clear()
        self._by_peers.clear()

    @property
    def remembered(self) -> int:
        return len(self._cache) + len(self._older)

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
        denied: list[PortAtom] = []
        for policy in policies:
            for rule in policy.egress:
                if any(name_matches(p, canonical) for p in rule.to):
                    found = _spec_atoms(rule.ports)
                    (atoms if rule.action is Action.ALLOW else denied).extend(found)
        if any(a == ANY for a in atoms):
            if not denied:
                return NameDecision(decision, (ANY,))
            atoms = list(_EVERY_PORT_OF_EACH)
        opened = atomize(atoms, self._cuts.get(identity, {}))
        return NameDecision(
            decision, tuple(a for a in opened if not any(_within(a, d) for d in denied))
        )
