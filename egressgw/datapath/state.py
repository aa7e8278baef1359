"""What the datapath should hold, as plain values, and how it maps onto set elements.

In: identities, workload addresses, SNAT targets, CIDR rules as boxes, learned (name-derived)
destinations. Out: raw ``Element``s per set. Pure: no kernel, no clock.

Interval (pipapo) sets refuse overlapping elements, so CIDR boxes are made disjoint per identity
before they are encoded (``disjoint``); learned port ranges must be given as disjoint atoms by the
caller for the same reason.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from egressgw.datapath import keys
from egressgw.datapath.netlink import Element

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ANY_PROTO = (0, 255)
ANY_PORT = (0, 65535)


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

    @property
    def set_name(self) -> str:
        f = self.address.version
        if self.protocol is None:
            return f"allow{f}_any"
        if self.ports[0] == self.ports[1]:
            return f"allow{f}"
        return f"allow{f}_range"

    def element(self, timeout_ms: int | None = None) -> Element:
        addr = keys.address(self.address)
        if self.protocol is None:
            return Element(key=keys.mark(self.identity) + addr, timeout_ms=timeout_ms)
        if self.ports[0] == self.ports[1]:
            key = (
                keys.mark(self.identity)
                + addr
                + keys.proto(self.protocol)
                + keys.port(self.ports[0])
            )
            return Element(key=key, timeout_ms=timeout_ms)
        ident, proto = keys.mark_be(self.identity), keys.proto(self.protocol)
        return Element(
            key=ident + addr + proto + keys.port(self.ports[0]),
            key_end=ident + addr + proto + keys.port(self.ports[1]),
            timeout_ms=timeout_ms,
        )


LEARNED_SETS = tuple(f"allow{f}{suffix}" for f in (4, 6) for suffix in ("", "_any", "_range"))


def learned_identity(set_name: str, element: Element) -> int:
    """The identity a learned element belongs to."""
    if set_name.endswith("_range"):
        return keys.parse_mark_be(element.key)
    return keys.parse_mark(element.key)


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
