"""Two per-client bounds of the DNS path: learned addresses per identity, queries per source.

In: the addresses an answer releases to an identity (with their lifetime and port atoms), and
each query's source with the time. Out: the learned elements to revoke so the identity stays
within its cap (the ones expiring first, never those of the answer being released), and whether
a source is within its rate. Pure bookkeeping: it never touches the datapath, and time is a
parameter of every call.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

from egressgw.datapath.keys import parse_address
from egressgw.datapath.state import Learned, PortAtom, atom_order
from egressgw.identity import IPAddress

Source = str  # the query's source address as the socket reports it


class AddressBudget:
    """Addresses learned per identity, for the per-identity cap (oldest expiring evicted).

    Per identity: packed address -> (expiry, port atoms), and a heap of (expiry, address) with
    lazy deletion, so admitting an answer costs O(addresses log n) even at the cap.
    """

    def __init__(self) -> None:
        self.known: dict[int, dict[bytes, tuple[float, tuple[PortAtom, ...]]]] = {}
        self.heaps: dict[int, list[tuple[float, bytes]]] = {}

    def admit(
        self,
        identity: int,
        addresses: Sequence[IPAddress],
        atoms: tuple[PortAtom, ...],
        until: float,
        cap: int,
    ) -> list[Learned]:
        """Record addresses; returns the elements to revoke to stay within ``cap``."""
        known = self.known.setdefault(identity, {})
        heap = self.heaps.setdefault(identity, [])
        fresh = set()
        for address in addresses:
            key = address.packed
            fresh.add(key)
            old = known.get(key)
            if old is None:
                known[key] = (until, atoms)
            elif old[0] >= until and set(atoms) <= set(old[1]):
                continue
            else:
                merged = tuple(sorted(set(atoms) | set(old[1]), key=atom_order))
                known[key] = (max(until, old[0]), merged)
            heapq.heappush(heap, (known[key][0], key))
        evicted: list[Learned] = []
        kept_back: list[tuple[float, bytes]] = []
        while len(known) > cap and heap:
            expiry, key = heapq.heappop(heap)
            entry = known.get(key)
            if entry is None or entry[0] != expiry:
                continue  # superseded by a later expiry
            if key in fresh:
                kept_back.append((expiry, key))  # never evict what this answer releases
                continue
            del known[key]
            evicted.extend(learned_elements(identity, [parse_address(key)], entry[1]))
        for item in kept_back:
            heapq.heappush(heap, item)
        if len(heap) > 2 * len(known) + 1024:  # drop superseded entries now and then
            heap[:] = [(exp, key) for key, (exp, _atoms) in known.items()]
            heapq.heapify(heap)
        return evicted

    def forget_expired(self, now: float) -> int:
        """Forget addresses whose elements the kernel has expired by ``now``; how many."""
        dropped = 0
        for identity, heap in list(self.heaps.items()):
            known = self.known.get(identity, {})
            while heap and heap[0][0] <= now:
                expiry, key = heapq.heappop(heap)
                entry = known.get(key)
                if entry is not None and entry[0] == expiry:  # not refreshed since
                    del known[key]
                    dropped += 1
            if not known:
                del self.heaps[identity]
                self.known.pop(identity, None)
        if not self.known:  # emptied, a dict keeps its room until it is cleared
            self.known.clear()
            self.heaps.clear()
        return dropped

    def retain(self, identities: Iterable[int]) -> None:
        """Forget identities that no longer exist."""
        keep = set(identities)
        for gone in [i for i in self.known if i not in keep]:
            del self.known[gone]
            self.heaps.pop(gone, None)


def learned_elements(
    identity: int, addresses: Iterable[IPAddress], atoms: Iterable[PortAtom]
) -> list[Learned]:
    atoms = tuple(atoms)
    return [Learned(identity, a, proto, (lo, hi)) for a in addresses for proto, lo, hi in atoms]


class RateLimiter:
    """Per source a token bucket, kept as one number: the time by which its queries so far are
    paid for at ``rate`` (GCRA). A query is allowed while that time, plus the query's own cost,
    is at most ``burst`` queries' worth ahead of now. Sources that owe nothing are forgotten in
    bulk when ``max_sources`` are tracked."""

    def __init__(self, rate: float, burst: float, max_sources: int = 65536) -> None:
        self.interval = 1.0 / rate
        self.tolerance = burst * self.interval * (1 + 1e-9)  # sums of intervals round up
        self.max_sources = max_sources
        self._paid_until: dict[Source, float] = {}

    @property
    def tracked(self) -> int:
        return len(self._paid_until)

    def forget_paid(self, now: float) -> int:
        """Forget the sources that owe nothing by ``now``; how many."""
        paid_until = self._paid_until
        paid = [source for source, t in paid_until.items() if t <= now]
        for source in paid:
            del paid_until[source]
        if not paid_until:
            paid_until.clear()  # in place: the room it had goes back, the dict stays put
        return len(paid)

    def allow(self, source: Source, now: float) -> bool:
        paid_until = self._paid_until.get(source)
        if paid_until is None:
            if len(self._paid_until) >= self.max_sources:
                owing = {k: t for k, t in self._paid_until.items() if t > now}
                self._paid_until = owing if len(owing) < self.max_sources else {}
            paid_until = now
        elif paid_until < now:
            paid_until = now
        paid_until += self.interval
        if paid_until - now > self.tolerance:
            return False
        self._paid_until[source] = paid_until
        return True
