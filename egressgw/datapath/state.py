"""What the datapath should hold, as plain values, and how it maps onto set elements.

In: identities, workload addresses, SNAT targets, CIDR rules as boxes, learned (name-derived)
destinations. Out: raw ``Element``s per set, and for a learned element already in the kernel what
it must become under a new policy (``redecide``). Pure: no kernel, no clock.

Interval (pipapo) sets refuse overlapping elements, so CIDR boxes are made disjoint per identity
before they are encoded (``disjoint``); learned port ranges must be given as disjoint atoms by the
caller for the same reason.

A learned element remembers the names whose answers opened it: their canonical forms, joined by
",", are its kernel comment (``names_comment``). Any apply, and the first one after a restart,
asks the policy in force which port atoms each of those names opens for the element's identity
now, and keeps, narrows or removes the element accordingly. An element without names (written
by an older version) is tied to nothing, so it is removed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from egressgw.datapath import keys
from egressgw.datapath.netlink import MAX_COMMENT_BYTES, Element

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ANY_PROTO = (0, 255)
ANY_PORT = (0, 65535)
PortAtom = tuple[int | None, int, int]  # (protocol or None for every protocol, first, last port)
ANY_ATOM: PortAtom = (None, 0, 65535)


class LearnedPolicy(Protocol):
    """The policy in force, as far as learned elements are concerned."""

    def ports_of(self, identity: int, name: str) -> tuple[PortAtom, ...]:
        """The port atoms an answer for ``name`` opens for ``identity`` now; () for none."""
        ...

    def decides_alike(self, identity: int, other: LearnedPolicy) -> bool:
        """Whether ``other`` opens exactly the same for every name of ``identity``."""
        ...


@dataclass(frozen=True, slots=True, order=True)
class Box:
    """(identity, destination address range, protocol range, port range), all inclusive."""

    identity: int
    family: int
    addr: tuple[int, int]
    proto: tuple[int, int] = ANY_PROTO
    port: tuple[int, int] = ANY_PORT

    @classmethod
    def of(
        cls,
        identity: int,
        network: IPNetwork,
        proto: tuple[int, int] = ANY_PROTO,
        port: tuple[int, int] = ANY_PORT,
    ) -> Box:
        lo, hi = int(network.network_address), int(network.broadcast_address)
        return cls(identity, network.version, (lo, hi), proto, port)

    def _dims(self) -> tuple[tuple[int, int], ...]:
        return (self.addr, self.proto, self.port)

    def intersects(self, other: Box) -> bool:
        if (self.identity, self.family) != (other.identity, other.family):
            return False
        return all(
            a[0] <= b[1] and b[0] <= a[1] for a, b in zip(self._dims(), other._dims(), strict=True)
        )

    def minus(self, other: Box) -> list[Box]:
        """Disjoint boxes covering self but not other."""
        if not self.intersects(other):
            return [self]
        pieces: list[Box] = []
        dims = list(self._dims())
        for axis, (lo, hi) in enumerate(dims):
            olo, ohi = other._dims()[axis]
            if lo < olo:
                pieces.append(self._with(dims, axis, (lo, olo - 1)))
            if ohi < hi:
                pieces.append(self._with(dims, axis, (ohi + 1, hi)))
            dims[axis] = (max(lo, olo), min(hi, ohi))
        return pieces

    def _with(self, dims: list[tuple[int, int]], axis: int, span: tuple[int, int]) -> Box:
        d = list(dims)
        d[axis] = span
        return Box(self.identity, self.family, d[0], d[1], d[2])

    def element(self) -> Element:
        width = 4 if self.family == 4 else 16
        lo = self.addr[0].to_bytes(width, "big")
        hi = self.addr[1].to_bytes(width, "big")
        start = (
            keys.mark_be(self.identity) + lo + keys.proto(self.proto[0]) + keys.port(self.port[0])
        )
        end = keys.mark_be(self.identity) + hi + keys.proto(self.proto[1]) + keys.port(self.port[1])
        return Element(key=start, key_end=end)


def disjoint(boxes: Iterable[Box]) -> list[Box]:
    """The same coverage as ``boxes``, as boxes no two of which overlap (needed by pipapo)."""
    result: list[Box] = []
    for box in sorted(set(boxes)):
        pieces = [box]
        for existing in result:
            if not pieces:
                break
            pieces = [part for piece in pieces for part in piece.minus(existing)]
        result.extend(pieces)
    return sorted(result)


@dataclass(frozen=True, slots=True)
class Learned:
    """A destination learned from a DNS answer for one identity.

    ``protocol=None`` allows every port and protocol; otherwise ``ports`` is an inclusive range.
    """

    identity: int
    address: IPAddress
    protocol: int | None = None
    ports: tuple[int, int] = ANY_PORT

    @classmethod
    def of_atom(cls, identity: int, address: IPAddress, atom: PortAtom) -> Learned:
        proto, first, last = atom
        return cls(identity, address, proto, (first, last))

    @classmethod
    def from_element(cls, set_name: str, element: Element) -> Learned:
        """The learned destination a kernel element of ``set_name`` stands for."""
        key = element.key
        width = 4 if set_name.startswith("allow4") else 16
        address = keys.parse_address(key[4 : 4 + width])
        if set_name.endswith("_any"):
            return cls(keys.parse_mark(key), address)
        proto, port = key[4 + width], int.from_bytes(key[8 + width : 10 + width], "big")
        if set_name.endswith("_range"):
            assert element.key_end is not None
            last = int.from_bytes(element.key_end[8 + width : 10 + width], "big")
            return cls(keys.parse_mark_be(key), address, proto, (port, last))
        return cls(keys.parse_mark(key), address, proto, (port, port))

    @property
    def atom(self) -> PortAtom:
        return (self.protocol, *self.ports)

    @property
    def set_name(self) -> str:
        f = self.address.version
        if self.protocol is None:
            return f"allow{f}_any"
        if self.ports[0] == self.ports[1]:
            return f"allow{f}"
        return f"allow{f}_range"

    def element(self, timeout_ms: int | None = None, names: str | None = None) -> Element:
        """The kernel element; ``names`` (see ``names_comment``) becomes its comment."""
        addr = keys.address(self.address)
        if self.protocol is None:
            key = keys.mark(self.identity) + addr
            return Element(key=key, timeout_ms=timeout_ms, comment=names)
        if self.ports[0] == self.ports[1]:
            key = (
                keys.mark(self.identity)
                + addr
                + keys.proto(self.protocol)
                + keys.port(self.ports[0])
            )
            return Element(key=key, timeout_ms=timeout_ms, comment=names)
        ident, proto = keys.mark_be(self.identity), keys.proto(self.protocol)
        return Element(
            key=ident + addr + proto + keys.port(self.ports[0]),
            key_end=ident + addr + proto + keys.port(self.ports[1]),
            timeout_ms=timeout_ms,
            comment=names,
        )


def names_of(comment: str | None) -> tuple[str, ...]:
    """The names a learned element's comment records."""
    return tuple(comment.split(",")) if comment else ()


def names_comment(names: Iterable[str]) -> str:
    """Names as a learned element's comment: as many as fit, in the order given.

    A name that does not fit is not recorded; the element then outlives a policy change only
    through the names that are (it is removed sooner, never kept longer)."""
    out = ""
    for name in names:
        joined = f"{out},{name}" if out else name
        if len(joined.encode()) <= MAX_COMMENT_BYTES:
            out = joined
    return out


def with_name(comment: str | None, name: str) -> str | None:
    """``comment`` with ``name`` added; None when it is already there (nothing to write)."""
    if comment is not None and (comment == name or name in comment.split(",")):
        return None
    return names_comment((*names_of(comment), name))


def atoms_overlap(a: PortAtom, b: PortAtom) -> bool:
    if a[0] is None or b[0] is None:
        return True
    return a[0] == b[0] and a[1] <= b[2] and b[1] <= a[2]


def redecide(atom: PortAtom, allowed: Iterable[PortAtom]) -> tuple[PortAtom, ...]:
    """What a learned element of ``atom`` becomes when its names now open ``allowed``: the
    allowed atoms it overlaps. ``(atom,)`` means it stays as it is; () means it goes.

    An element is never widened beyond one allowed atom it overlaps, which is exactly what a
    fresh answer for the same names would program now (ports narrowed, a Deny rule's ports
    carved out, or port ranges cut differently all come out as the new atoms)."""
    return tuple(sorted({a for a in allowed if atoms_overlap(a, atom)}, key=atom_order))


def atom_order(atom: PortAtom) -> tuple[int, int, int]:
    return (-1 if atom[0] is None else atom[0], atom[1], atom[2])


LEARNED_SETS = tuple(f"allow{f}{suffix}" for f in (4, 6) for suffix in ("", "_any", "_range"))


def learned_identity(set_name: str, element: Element) -> int:
    """The identity a learned element belongs to."""
    if set_name.endswith("_range"):
        return keys.parse_mark_be(element.key)
    return keys.parse_mark(element.key)


def whole_seconds_ms(lifetime_s: float) -> int:
    """A kernel timeout of whole seconds, at least one, covering ``lifetime_s``."""
    return max(1000, int(lifetime_s * 1000) + 999) // 1000 * 1000


Fate = tuple[tuple[str, Element], ...] | None  # None: keep; else what replaces it
KEEP: Fate = None
REMOVE: Fate = ()


class Judge:
    """Decides learned elements under one policy, remembering per (identity, name) what the
    policy opens, so a name shared by many elements is asked about once. The elements of an
    identity that ``previous`` (the policy they were decided under) decides alike are kept
    without a look, so an apply that changes one workload's policies costs that workload's
    elements, not every element."""

    def __init__(
        self,
        desired: DesiredState,
        policy: LearnedPolicy | None,
        now: float,
        previous: LearnedPolicy | None = None,
    ) -> None:
        self.identities = desired.identities
        self.policy = policy
        self.now = now
        self.previous = previous
        self._ports: dict[tuple[int, str], tuple[PortAtom, ...]] = {}
        self._alike: dict[int, bool] = {}

    def _unchanged(self, identity: int) -> bool:
        found = self._alike.get(identity)
        if found is None:
            assert self.policy is not None
            previous = self.previous
            found = previous is not None and self.policy.decides_alike(identity, previous)
            self._alike[identity] = found
        return found

    def _ports_of(self, identity: int, name: str) -> tuple[PortAtom, ...]:
        key = (identity, name)
        found = self._ports.get(key)
        if found is None:
            assert self.policy is not None
            found = self._ports[key] = self.policy.ports_of(identity, name)
        return found

    def fate(self, set_name: str, entry: tuple[float, Element]) -> Fate:
        expiry, element = entry
        identity = learned_identity(set_name, element)
        if identity not in self.identities:
            return REMOVE
        if self.policy is None or self._unchanged(identity):
            return KEEP
        learned = Learned.from_element(set_name, element)
        names = names_of(element.comment)
        opened = {n: self._ports_of(identity, n) for n in names}
        pieces = redecide(learned.atom, (a for atoms in opened.values() for a in atoms))
        if pieces == (learned.atom,):
            return KEEP
        remaining_s = expiry - self.now
        if not pieces or remaining_s <= 0:
            return REMOVE
        timeout_ms = whole_seconds_ms(remaining_s)
        out = []
        for atom in pieces:
            piece = Learned.of_atom(identity, learned.address, atom)
            comment = names_comment(n for n, atoms in opened.items() if atom in atoms)
            out.append((piece.set_name, piece.element(timeout_ms, comment)))
        return tuple(out)


@dataclass
class DesiredState:
    """Everything the control plane decides; learned elements are not part of it."""

    identities: dict[int, str] = field(default_factory=dict)  # id -> identity key (comment)
    workloads: dict[IPAddress, int] = field(default_factory=dict)
    snat: dict[int, dict[int, IPAddress]] = field(default_factory=lambda: {4: {}, 6: {}})
    egress_ips: set[IPAddress] = field(default_factory=set)
    allow_net: set[Box] = field(default_factory=set)
    deny_net: set[Box] = field(default_factory=set)
    audit: set[int] = field(default_factory=set)
    default_allow: set[int] = field(default_factory=set)

    def static_elements(self) -> dict[str, dict[tuple[bytes, bytes | None], Element]]:
        """Every element of every control-plane set, keyed by what identifies it."""
        out: dict[str, list[Element]] = {
            "identities": [
                Element(key=keys.mark(i), comment=c) for i, c in self.identities.items()
            ],
            "audit": [Element(key=keys.mark(i)) for i in self.audit],
            "default_allow": [Element(key=keys.mark(i)) for i in self.default_allow],
            "acct_accepted": [Element(key=keys.mark(i)) for i in self.identities],
            "acct_rejected": [Element(key=keys.mark(i)) for i in self.identities],
        }
        for f in (4, 6):
            out[f"workloads{f}"] = [
                Element(key=keys.address(a), data=keys.mark(i))
                for a, i in self.workloads.items()
                if a.version == f
            ]
            out[f"snat{f}"] = [
                Element(key=keys.mark(i), data=keys.address(a)) for i, a in self.snat[f].items()
            ]
            out[f"egress_ips{f}"] = [
                Element(key=keys.address(a)) for a in self.egress_ips if a.version == f
            ]
            out[f"allow{f}_net"] = [b.element() for b in _disjoint_of_family(self.allow_net, f)]
            out[f"deny{f}_net"] = [b.element() for b in _disjoint_of_family(self.deny_net, f)]
        return {name: {e.identity(): e for e in elems} for name, elems in out.items()}


def _disjoint_of_family(boxes: Iterable[Box], family: int) -> Iterator[Box]:
    by_identity: dict[int, list[Box]] = {}
    for box in boxes:
        if box.family == family:
            by_identity.setdefault(box.identity, []).append(box)
    for identity in sorted(by_identity):
        yield from disjoint(by_identity[identity])


def same_element(a: Element, b: Element) -> bool:
    """Equal as far as the control plane is concerned (data and comment included)."""
    return (a.key, a.key_end, a.data, a.comment) == (b.key, b.key_end, b.data, b.comment)
