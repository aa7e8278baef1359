"""Per-identity name decisions, and which ports an allowed name opens.

In: each identity's gateway and policies (from the plan). Out: for (identity, name) a
``NameDecision``: the policy layer's verdict and reason, and the (protocol, port range) atoms to
program for the answer's addresses. Decisions are memoised per plan; a new plan means a new
``NamePolicy``. Pure: no I/O, no clock.

Port ranges are split into atoms on every range boundary of the identity's rules, so two
programmed ranges of one identity are either equal or disjoint: interval sets refuse overlaps.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from egressgw.policy.decide import Decision, Verdict, decide_name, deciding_policies, name_matches
from egressgw.policy.fqdn import InvalidName, canonical_name
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

    def decide(self, identity: int, name: str) -> NameDecision:
        key = (identity, name)
        found = self._cache.get(key)
        if found is None:
            found = self._decide(identity, name)
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
                self._decisions.clear()
            found = self._decisions.setdefault(found, found)
            self._cache[key] = found
        return found

    def _decide(self, identity: int, name: str) -> NameDecision:
        selection = self._identities.get(identity)
        if selection is None:
            return NameDecision(Decision(Verdict.DENY, "unknown workload identity"))
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
