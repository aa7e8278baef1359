"""The nftables datapath of this network namespace: adopt, reconcile, program learned elements.

In: ``DesiredState`` from the control plane, ``Learned`` destinations from DNS answers.
Out: kernel set elements, each change one netlink transaction.

It never flushes what it finds: ``adopt`` loads the skeleton with ``add`` (keeping every set's
elements) and reads the elements back, so learned destinations and established flows keep
working across a restart; ``reconcile`` then changes only what differs.

Kernel facts this relies on (checked by tests/kernel/test_datapath_kernel.py on the running kernel):
- re-adding an existing element with the same timeout does not restart its timeout (6.18 only
  refreshes when the timeout value differs, older kernels never do), so a refresh is a
  DESTROYSETELEM (Linux 6.3+) followed by an add, both in one transaction;
- an element's remaining lifetime is reported as NFTA_SET_ELEM_EXPIRATION in milliseconds.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from egressgw.datapath import keys, skeleton
from egressgw.datapath.netlink import Change, Element, NftSocket, Op
from egressgw.datapath.netns import call_in
from egressgw.datapath.state import (
    LEARNED_SETS,
    DesiredState,
    Learned,
    learned_identity,
    same_element,
)

log = logging.getLogger(__name__)

ElementKey = tuple[bytes, bytes | None]
Clock = Callable[[], float]


class UnknownIdentity(LookupError):
    """Learned elements were offered for an identity the datapath does not hold."""


@dataclass
class Traffic:
    accepted_packets: int = 0
    accepted_bytes: int = 0
    rejected_packets: int = 0
    rejected_bytes: int = 0


@dataclass
class ReconcileResult:
    added: int = 0
    removed: int = 0
    learned_removed: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.learned_removed)


@dataclass
class Adopted:
    """What a previous run left in the kernel."""

    identities: dict[int, str] = field(default_factory=dict)
    egress_ips: set[keys.IPAddress] = field(default_factory=set)
    learned: int = 0
    static: int = 0


class NftDatapath:
    """The kernel side. Methods are synchronous and fast (one sendmsg per change)."""

    def __init__(
        self, table: str, uplink: str, netns: str | None = None, clock: Clock = time.monotonic
    ) -> None:
        self.table = table
        self.uplink = uplink
        self.netns = netns
        self._clock = clock
        self._sock: NftSocket | None = None
        self._static: dict[str, dict[ElementKey, Element]] = {}
        # set -> element key -> (expiry on our clock, element); mirrors learned elements so a
        # destination that already outlives the requested lifetime costs no netlink round trip.
        self._learned: dict[str, dict[ElementKey, tuple[float, Element]]] = {}
        # (expiry, tie-breaker, set, key) for every mirror write, so forgetting what expired
        # touches only that; entries superseded by a later write are skipped when they come up
        self._expiries: list[tuple[float, int, str, ElementKey]] = []
        self._writes = itertools.count()
        # reconcile runs in a worker thread while DNS answers program from the event loop
        self._lock = threading.RLock()

    @property
    def sock(self) -> NftSocket:
        if self._sock is None:
            raise RuntimeError("datapath not adopted yet")
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def adopt(self) -> Adopted:
        """Load the skeleton (keeping existing elements) and read back what is in force."""
        skeleton.load(self.table, self.uplink, self.netns)
        if self._sock is None:
            self._sock = call_in(self.netns, lambda: NftSocket(self.table))
        now = self._clock()
        adopted = Adopted()
        self._static = {}
        self._learned = {}
        for name in skeleton.SET_SPECS:
            elements = self.sock.dump(name)
            if name in LEARNED_SETS:
                self._learned[name] = {
                    e.identity(): (now + (e.expiration_ms or 0) / 1000.0, e) for e in elements
                }
                adopted.learned += len(elements)
            else:
                self._static[name] = {e.identity(): e for e in elements}
                adopted.static += len(elements)
        self._rebuild_expiries()
        for element in self._static["identities"].values():
            adopted.identities[keys.parse_mark(element.key)] = element.comment or ""
        for f in (4, 6):
            for element in self._static[f"egress_ips{f}"].values():
                adopted.egress_ips.add(keys.parse_address(element.key))
        return adopted

    def reconcile(self, desired: DesiredState) -> ReconcileResult:
        """Make the control-plane sets equal to ``desired`` in one transaction.

        Learned elements of identities that no longer exist are removed in the same transaction.
        On failure nothing changes, in the kernel or in the mirror.
        """
        with self._lock:
            wanted = desired.static_elements()
            result = ReconcileResult()
            removals: list[Change] = []
            additions: list[Change] = []
            for name, want in wanted.items():
                have = self._static.get(name, {})
                stale = [
                    e for k, e in have.items() if k not in want or not same_element(e, want[k])
                ]
                fresh = [
                    e for k, e in want.items() if k not in have or not same_element(have[k], e)
                ]
                if stale:
                    removals.append(Change(Op.DELETE, name, tuple(stale)))
                    result.removed += len(stale)
                if fresh:
                    additions.append(Change(Op.ADD, name, tuple(fresh)))
                    result.added += len(fresh)
            gone: dict[str, list[ElementKey]] = {}
            for name in LEARNED_SETS:
                orphans = [
                    (k, e)
                    for k, (_, e) in self._learned.get(name, {}).items()
                    if learned_identity(name, e) not in desired.identities
                ]
                if orphans:
                    removals.append(Change(Op.DESTROY, name, tuple(e for _, e in orphans)))
                    gone[name] = [k for k, _ in orphans]
                    result.learned_removed += len(orphans)
            if not removals and not additions:
                return result
            self.sock.apply(removals + additions)
            self._static = {name: dict(want) for name, want in wanted.items()}
            for name, dropped in gone.items():
                for key in dropped:
                    self._learned[name].pop(key, None)
            return result

    def program(self, learned: Iterable[Learned], lifetime_s: float) -> int:
        """Allow each learned destination for at least ``lifetime_s`` seconds from now.

        One transaction; elements whose kernel lifetime already covers it are left alone.
        Returns the number of elements written (0 when everything was already in force).
        """
        with self._lock:
            now = self._clock()
            needed_until = now + lifetime_s
            timeout_ms = max(1000, int(lifetime_s * 1000) + 999) // 1000 * 1000
            changes: list[Change] = []
            writes: list[tuple[str, ElementKey, Element]] = []
            by_set: dict[str, list[Element]] = {}
            held_identities = self._static.get("identities", {})
            for item in learned:
                if (keys.mark(item.identity), None) not in held_identities:
                    # an answer resolved under an older plan: its identity is gone, and its
                    # number may be handed to another workload; programming it would leak
                    raise UnknownIdentity(f"identity {item.identity} is not in the datapath")
                element = item.element(timeout_ms)
                by_set.setdefault(item.set_name, []).append(element)
            for name, elements in by_set.items():
                mirror = self._learned.setdefault(name, {})
                stale: list[Element] = []
                fresh: list[Element] = []
                for element in elements:
                    known = mirror.get(element.identity())
                    if known is not None and known[0] >= needed_until:
                        continue
                    if known is not None:
                        stale.append(element)
                    fresh.append(element)
                    writes.append((name, element.identity(), element))
                if stale:
                    changes.append(Change(Op.DESTROY, name, tuple(stale)))
                if fresh:
                    changes.append(Change(Op.ADD, name, tuple(fresh)))
            if not changes:
                return 0
            self.sock.apply(changes)
            expiry = now + timeout_ms / 1000.0
            for name, key, element in writes:
                self._learned[name][key] = (expiry, element)
                heapq.heappush(self._expiries, (expiry, next(self._writes), name, key))
            return len(writes)

    def revoke(self, learned: Iterable[Learned]) -> int:
        """Remove learned destinations now (cap evictions); one transaction."""
        with self._lock:
            by_set: dict[str, list[Element]] = {}
            for item in learned:
                by_set.setdefault(item.set_name, []).append(item.element())
            changes = [Change(Op.DESTROY, name, tuple(elems)) for name, elems in by_set.items()]
            if not changes:
                return 0
            self.sock.apply(changes)
            for name, elems in by_set.items():
                for element in elems:
                    self._learned.get(name, {}).pop(element.identity(), None)
            return sum(len(e) for e in by_set.values())

    def forget_expired(self) -> int:
        """Drop mirror entries the kernel has expired; returns how many.

        Costs what expired (log n each), not the size of the mirror: it runs on the thread that
        answers DNS queries."""
        with self._lock:
            now = self._clock()
            heap, dropped = self._expiries, 0
            while heap and heap[0][0] <= now:
                expiry, _, name, key = heapq.heappop(heap)
                mirror = self._learned.get(name, {})
                entry = mirror.get(key)
                if entry is not None and entry[0] <= expiry:  # not written again since
                    del mirror[key]
                    dropped += 1
            if len(heap) > 2 * sum(map(len, self._learned.values())) + 4096:
                self._rebuild_expiries()  # mostly superseded or removed entries: start over
            return dropped

    def _rebuild_expiries(self) -> None:
        """The expiry heap from the mirror alone: one entry per learned element."""
        self._expiries = [
            (expiry, next(self._writes), name, key)
            for name, mirror in self._learned.items()
            for key, (expiry, _element) in mirror.items()
        ]
        heapq.heapify(self._expiries)

    def counters(self) -> dict[int, Traffic]:
        """Packets and bytes toward the uplink per identity, accepted and rejected."""
        out: dict[int, Traffic] = {}
        for name, accepted in (("acct_accepted", True), ("acct_rejected", False)):
            for element in self.sock.dump(name):
                packets, octets = element.counter or (0, 0)
                traffic = out.setdefault(keys.parse_mark(element.key), Traffic())
                if accepted:
                    traffic.accepted_packets, traffic.accepted_bytes = packets, octets
                else:
                    traffic.rejected_packets, traffic.rejected_bytes = packets, octets
        return out

    def learned_by_identity(self) -> dict[int, int]:
        """How many learned elements each identity has in the mirror."""
        with self._lock:
            counts: dict[int, int] = {}
            for name, mirror in self._learned.items():
                for _expiry, element in mirror.values():
                    identity = learned_identity(name, element)
                    counts[identity] = counts.get(identity, 0) + 1
            return counts

    def static_count(self, set_name: str) -> int:
        return len(self._static.get(set_name, {}))
