"""The nftables datapath of this network namespace: adopt, reconcile, program learned elements.

In: ``DesiredState`` from the control plane, ``Learned`` destinations from DNS answers.
Out: kernel set elements, each change one netlink transaction.

It never flushes what it finds: ``adopt`` loads the skeleton with ``add`` (keeping every set's
elements) and reads the elements back, so learned destinations and established flows keep
working across a restart; ``reconcile`` then changes only what differs, and decides every learned
element again under the policy it is given (by the names the element records, see ``state``),
so what that policy no longer allows goes in the same transaction, at the first reconcile after
a restart too. It may not decide policy itself: ``LearnedPolicy`` says what a name opens.

Kernel facts this relies on (checked by tests/kernel/test_datapath_kernel.py on the running kernel):
- re-adding an existing element with the same timeout does not restart its timeout (6.18 only
  refreshes when the timeout value differs, older kernels never do), so a refresh is a
  DESTROYSETELEM (Linux 6.3+) followed by an add, both in one transaction;
- an element's remaining lifetime is reported as NFTA_SET_ELEM_EXPIRATION in milliseconds;
- an element's comment (its userdata) is kept and dumped back as written, up to 251 bytes
  (tests/kernel/test_netlink_sizes.py; a longer one is refused or, at 253, silently dropped).

``GatewayTunnel`` (only with a node name) adds the tunnel from worker nodes beside the table:
what it relies on is listed in ``tunnel`` and checked by tests/kernel/test_tunnel.py.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from egressgw.datapath import keys, skeleton
from egressgw.datapath.netlink import (
    SOCKET_BUFFER_BYTES,
    Change,
    Element,
    NftSocket,
    Op,
    TransactionTooLarge,
)
from egressgw.datapath.netns import call_in
from egressgw.datapath.state import (
    LEARNED_SETS,
    DesiredState,
    Fate,
    Judge,
    Learned,
    LearnedPolicy,
    learned_identity,
    same_element,
    whole_seconds_ms,
    with_name,
)
from egressgw.datapath.tunnel import (
    Changes,
    Route,
    Rule,
    Tunnel,
    TunnelError,
    TunnelSettings,
    host_network,
    next_hop,
)

log = logging.getLogger(__name__)

ElementKey = tuple[bytes, bytes | None]
Clock = Callable[[], float]
# Sets whose elements let traffic through: removing one closes, adding one opens. A Deny box
# (CLOSING_SETS) works the other way round. The rest only describe (identities, accounting,
# the egress IPs held) and go in with the closing half.
OPENING_SETS = frozenset(
    {"default_allow", "audit"}
    | {f"{kind}{f}" for kind in ("snat", "workloads") for f in (4, 6)}
    | {f"allow{f}_net" for f in (4, 6)}
)
CLOSING_SETS = frozenset(f"deny{f}_net" for f in (4, 6))


_Halves = tuple[list[Change], list[Change]]


class UnknownIdentity(LookupError):
    """Learned elements were offered for an identity the datapath does not hold."""


class StalePolicy(RuntimeError):
    """Learned elements were offered under a policy that is no longer the one in force."""


class DatapathBusy(TimeoutError):
    """The datapath stayed busy with a reconcile for longer than the caller could wait."""


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
    learned_removed: int = 0  # learned elements revoked (or replaced by narrower ones)
    learned_rewritten: int = 0  # the narrower elements written in their place

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


def _adopted(sock: NftSocket | None) -> NftSocket:
    """A socket ``NftDatapath.adopt`` opens; an error before it has."""
    if sock is None:
        raise RuntimeError("datapath not adopted yet")
    return sock


class NftDatapath:
    """The kernel side. Methods are synchronous and fast (one sendmsg per change)."""

    def __init__(
        self,
        table: str,
        uplink: str,
        netns: str | None = None,
        clock: Clock = time.monotonic,
        buffer_bytes: int = SOCKET_BUFFER_BYTES,
    ) -> None:
        self.table = table
        self.buffer_bytes = buffer_bytes
        self.uplink = uplink
        self.netns = netns
        self._clock = clock
        self._sock: NftSocket | None = None
        # the scrape's counter dumps go over a socket of their own: a long apply holds the
        # other one for as long as it writes, and a scrape need not wait for it
        self._reader: NftSocket | None = None
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
        self._reconcile_lock = threading.Lock()  # one reconcile at a time
        self._in_force: LearnedPolicy | None = None  # what ``program`` accepts elements under
        # bumped when a reconcile is about to change the kernel; ``unsettled`` then names the
        # identities whose learned elements it removes or rewrites: what was answered from
        # memory for them under an older epoch must be decided again (the others' stands)
        self.epoch = 0
        self.unsettled: frozenset[int] = frozenset()
        self._learned_counts: dict[int, int] = {}  # what learned_by_identity found last

    @property
    def sock(self) -> NftSocket:
        return _adopted(self._sock)

    def close(self) -> None:
        for sock in (self._sock, self._reader):
            if sock is not None:
                sock.close()
        self._sock = self._reader = None

    def adopt(self) -> Adopted:
        """Load the skeleton (keeping existing elements) and read back what is in force."""
        skeleton.load(self.table, self.uplink, self.netns)
        if self._sock is None:
            self._sock = call_in(self.netns, lambda: NftSocket(self.table, self.buffer_bytes))
        if self._reader is None:
            self._reader = call_in(self.netns, lambda: NftSocket(self.table))
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

    def reconcile(
        self,
        desired: DesiredState,
        policy: LearnedPolicy | None = None,
        committed: Callable[[], None] | None = None,
    ) -> ReconcileResult:
        """Make the control-plane sets equal to ``desired``, and every learned element what
        ``policy`` allows now, in one transaction.

        Learned elements of identities that no longer exist are removed. With ``policy``, every
        other learned element is re-decided against it by the names it records (``redecide``):
        kept, narrowed or removed, keeping its remaining lifetime. After the kernel took the
        change, ``policy`` is the one in force: ``program`` refuses elements offered under any
        other, and ``committed`` runs before anything can be programmed under the new one.

        A change too large for one transaction goes in as a sequence: first everything that
        closes (removals of what opens traffic, additions of Deny boxes, revocations), then
        everything that opens, so every state in between allows no more than the old plan or,
        after the first half, than the new one. On failure the mirror matches the kernel; a
        failed sequence leaves no policy in force until a reconcile succeeds.
        """
        with self._reconcile_lock:
            wanted = desired.static_elements()
            closing, opening, result = self._static_changes(wanted)
            decided = self._redecide(desired, policy) if policy is not None else None
            with self._lock:
                learned_closing, learned_opening = self._learned_changes(desired, policy, decided)
                result.learned_removed = sum(len(c.elements) for c in learned_closing)
                result.learned_rewritten = sum(len(c.elements) for c in learned_opening)
                self.unsettled = frozenset(
                    learned_identity(c.set_name, e) for c in learned_closing for e in c.elements
                )
                self.epoch += 1  # after ``unsettled``: a reader of the new epoch sees its set
                phases = [
                    closing[0] + learned_closing + closing[1],
                    opening[0] + learned_opening + opening[1],
                ]
                if phases[0] or phases[1]:
                    self._apply(phases)
                self._in_force = policy
                if committed is not None:
                    committed()
            return result

    def _apply(self, phases: list[list[Change]]) -> None:
        """One transaction if the kernel takes it in one, else the phases in order."""
        changes = phases[0] + phases[1]
        try:
            self.sock.apply(changes)
        except TransactionTooLarge:
            log.info(
                "change of %d elements is larger than one transaction; applying it in steps",
                sum(len(c.elements) for c in changes),
            )
            self._in_force = None  # nothing is programmed on a state half-way between plans
            self.sock.apply_steps(phases, self._record)
            return
        for change in changes:
            self._record(change)

    def _record(self, change: Change) -> None:
        """Keep the mirror in step with one change the kernel took."""
        name = change.set_name
        if name in LEARNED_SETS:
            mirror = self._learned.setdefault(name, {})
            if change.op is not Op.ADD:
                for element in change.elements:
                    mirror.pop(element.identity(), None)
                return
            now = self._clock()
            for element in change.elements:
                expiry = now + (element.timeout_ms or 0) / 1000.0
                mirror[element.identity()] = (expiry, element)
                heapq.heappush(
                    self._expiries, (expiry, next(self._writes), name, element.identity())
                )
            return
        have = self._static.setdefault(name, {})
        if change.op is Op.ADD:
            for element in change.elements:
                have[element.identity()] = element
        else:
            for element in change.elements:
                have.pop(element.identity(), None)

    def _static_changes(
        self, wanted: dict[str, dict[ElementKey, Element]]
    ) -> tuple[_Halves, _Halves, ReconcileResult]:
        """(closing: before, after the learned revocations), (opening: before, after the
        learned rewrites), and the counts. Reads only the static mirror, which only reconcile
        writes, so it runs without holding up ``program``."""
        result = ReconcileResult()
        removals: list[Change] = []
        closing_adds: list[Change] = []
        opening_adds: list[Change] = []
        late_removals: list[Change] = []
        for name, want in wanted.items():
            have = self._static.get(name, {})
            stale = tuple(
                e for k, e in have.items() if k not in want or not same_element(e, want[k])
            )
            fresh = tuple(
                e for k, e in want.items() if k not in have or not same_element(have[k], e)
            )
            result.removed += len(stale)
            result.added += len(fresh)
            if name in CLOSING_SETS:  # a Deny box: adding it closes, removing it opens
                if fresh:
                    closing_adds.append(Change(Op.ADD, name, fresh))
                if stale:
                    late_removals.append(Change(Op.DELETE, name, stale))
                continue
            if stale:
                removals.append(Change(Op.DELETE, name, stale))
            if fresh:
                (opening_adds if name in OPENING_SETS else closing_adds).append(
                    Change(Op.ADD, name, fresh)
                )
        # workload addresses last: an address joins its identity once the identity's rules
        # are complete
        opening_adds.sort(key=lambda c: c.set_name.startswith("workloads"))
        return (removals, closing_adds), (opening_adds, late_removals), result

    def _redecide(
        self, desired: DesiredState, policy: LearnedPolicy
    ) -> dict[tuple[str, ElementKey], tuple[tuple[float, Element], Fate]]:
        """Every learned element's fate under ``policy``, worked out on a copy of the mirror so
        that ``program`` is not held up; what was written meanwhile is re-decided under the
        lock by ``_learned_changes``."""
        with self._lock:
            entries = [
                (name, key, entry)
                for name, mirror in self._learned.items()
                for key, entry in mirror.items()
            ]
        judge = Judge(desired, policy, self._clock(), self._in_force)
        return {(name, key): (entry, judge.fate(name, entry)) for name, key, entry in entries}

    def _learned_changes(
        self,
        desired: DesiredState,
        policy: LearnedPolicy | None,
        decided: dict[tuple[str, ElementKey], tuple[tuple[float, Element], Fate]] | None,
    ) -> tuple[list[Change], list[Change]]:
        """Under the lock: the revocations and rewrites of learned elements."""
        judge = Judge(desired, policy, self._clock(), self._in_force)
        destroy: dict[str, list[Element]] = {}
        add: dict[str, dict[ElementKey, Element]] = {}
        for name, mirror in self._learned.items():
            for key, entry in mirror.items():
                found = decided.get((name, key)) if decided is not None else None
                if found is not None and found[0] is entry:
                    fate = found[1]
                else:  # written since the copy was decided (or no copy): decide it now
                    fate = judge.fate(name, entry)
                if fate is None:  # kept as it is
                    continue
                destroy.setdefault(name, []).append(entry[1])
                for piece_set, piece in fate:
                    pieces = add.setdefault(piece_set, {})
                    other = pieces.get(piece.identity())
                    if other is None or (other.timeout_ms or 0) < (piece.timeout_ms or 0):
                        pieces[piece.identity()] = piece
        for name, pieces in add.items():  # a piece that is already in force stays as it is
            mirror = self._learned.get(name, {})
            dropped = {e.identity() for e in destroy.get(name, ())}
            for key in [k for k in pieces if k in mirror and k not in dropped]:
                del pieces[key]
        closing = [Change(Op.DESTROY, n, tuple(elems)) for n, elems in destroy.items()]
        opening = [Change(Op.ADD, n, tuple(p.values())) for n, p in add.items() if p]
        return closing, opening

    def program(
        self,
        learned: Iterable[Learned],
        lifetime_s: float,
        *,
        name: str | None = None,
        policy: LearnedPolicy | None = None,
        wait_s: float | None = None,
    ) -> int:
        """Allow each learned destination for at least ``lifetime_s`` seconds from now.

        ``name`` is recorded on each element as a reason it exists; ``policy`` is the policy
        the caller decided under, refused (``StalePolicy``) unless it is the one in force.
        While a reconcile holds the kernel, this waits at most ``wait_s`` (None: as long as it
        takes), then raises ``DatapathBusy``: an answer waits for its bound, not for a big
        change. One transaction; elements whose kernel lifetime already covers it and that
        already record ``name`` are left alone. Returns the number of elements written.
        """
        with self._held(wait_s):
            return self._program(learned, lifetime_s, name, policy)

    @contextlib.contextmanager
    def _held(self, wait_s: float | None) -> Iterator[None]:
        """The datapath's lock, waited for at most ``wait_s`` seconds (None: without bound)."""
        if not self._lock.acquire(timeout=-1 if wait_s is None else max(0.0, wait_s)):
            raise DatapathBusy(f"the datapath stayed busy with a change for {wait_s:.3f} s")
        try:
            yield
        finally:
            self._lock.release()

    def _program(
        self,
        learned: Iterable[Learned],
        lifetime_s: float,
        name: str | None,
        policy: LearnedPolicy | None,
    ) -> int:
        if policy is not None and policy is not self._in_force:
            raise StalePolicy("the policy changed; decide again under the one in force")
        now = self._clock()
        needed_until = now + lifetime_s
        timeout_ms = whole_seconds_ms(lifetime_s)
        changes: list[Change] = []
        by_set: dict[str, list[Element]] = {}
        held_identities = self._static.get("identities", {})
        for item in learned:
            if (keys.mark(item.identity), None) not in held_identities:
                # an answer resolved under an older plan: its identity is gone, and its
                # number may be handed to another workload; programming it would leak
                raise UnknownIdentity(f"identity {item.identity} is not in the datapath")
            element = item.element(timeout_ms, name)
            by_set.setdefault(item.set_name, []).append(element)
        for set_name, elements in by_set.items():
            mirror = self._learned.setdefault(set_name, {})
            stale: list[Element] = []
            fresh: list[Element] = []
            for element in elements:
                known = mirror.get(element.identity())
                if known is not None:
                    added = with_name(known[1].comment, name) if name else None
                    if known[0] >= needed_until and added is None:
                        continue
                    # rewritten: a refresh or a new reason; every name it had stays, and
                    # so does a longer life it had
                    element = element._replace(
                        comment=known[1].comment if added is None else added,
                        timeout_ms=max(timeout_ms, whole_seconds_ms(known[0] - now)),
                    )
                    stale.append(element)
                fresh.append(element)
            if stale:
                changes.append(Change(Op.DESTROY, set_name, tuple(stale)))
            if fresh:
                changes.append(Change(Op.ADD, set_name, tuple(fresh)))
        if not changes:
            return 0
        self.sock.apply(changes)
        for change in changes:
            self._record(change)
        return sum(len(c.elements) for c in changes if c.op is Op.ADD)

    def revoke(self, learned: Iterable[Learned], wait_s: float | None = None) -> int:
        """Remove learned destinations now (cap evictions); one transaction. Waits for a busy
        datapath as ``program`` does."""
        with self._held(wait_s):
            by_set: dict[str, list[Element]] = {}
            for item in learned:
                by_set.setdefault(item.set_name, []).append(item.element())
            changes = [Change(Op.DESTROY, name, tuple(elems)) for name, elems in by_set.items()]
            if not changes:
                return 0
            self.sock.apply(changes)
            for change in changes:
                self._record(change)
            return sum(len(e) for e in by_set.values())

    def forget_expired(self) -> int:
        """Drop mirror entries the kernel has expired; returns how many.

        Costs what expired (log n each), not the size of the mirror: it runs on the thread that
        answers DNS queries, so while a reconcile holds the datapath it does nothing (0)."""
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            now = self._clock()
            heap, dropped = self._expiries, 0
            while heap and heap[0][0] <= now:
                expiry, _, name, key = heapq.heappop(heap)
                mirror = self._learned.get(name, {})
                entry = mirror.get(key)
                if entry is not None and entry[0] <= expiry:  # not written again since
                    del mirror[key]
                    dropped += 1
                    if not mirror:  # emptied: a dict keeps the room of what it held
                        mirror.clear()
            if len(heap) > 2 * sum(map(len, self._learned.values())) + 4096:
                self._rebuild_expiries()  # mostly superseded or removed entries: start over
            return dropped
        finally:
            self._lock.release()

    def _rebuild_expiries(self) -> None:
        """The expiry heap from the mirror alone: one entry per learned element."""
        self._expiries = [
            (expiry, next(self._writes), name, key)
            for name, mirror in self._learned.items()
            for key, (expiry, _element) in mirror.items()
        ]
        heapq.heapify(self._expiries)

    def counters(self) -> dict[int, Traffic]:
        """Packets and bytes toward the uplink per identity, accepted and rejected: one dump
        of each accounting set (``NftSocket.dump_counters``), decoded without an ``Element``
        per identity. Over a socket of its own: it never waits for an apply."""
        reader = _adopted(self._reader)
        out: dict[int, Traffic] = {}
        for key, packets, octets in reader.dump_counters("acct_accepted"):
            out[keys.parse_mark(key)] = Traffic(packets, octets)
        for key, packets, octets in reader.dump_counters("acct_rejected"):
            identity = keys.parse_mark(key)
            traffic = out.get(identity)
            if traffic is None:
                out[identity] = Traffic(0, 0, packets, octets)
            else:
                traffic.rejected_packets, traffic.rejected_bytes = packets, octets
        return out

    def learned_by_identity(self) -> dict[int, int]:
        """How many learned elements each identity has in the mirror. Read at scrape time, on
        the event loop: while a reconcile holds the datapath, the counts of the last read."""
        if not self._lock.acquire(blocking=False):
            return dict(self._learned_counts)
        try:
            counts: dict[int, int] = {}
            for name, mirror in self._learned.items():
                for _expiry, element in mirror.values():
                    identity = learned_identity(name, element)
                    counts[identity] = counts.get(identity, 0) + 1
            self._learned_counts = counts
            return dict(counts)
        finally:
            self._lock.release()

    def static_count(self, set_name: str) -> int:
        return len(self._static.get(set_name, {}))


# --- the tunnel from worker nodes ------------------------------------------------------------

REPLY_TABLE = 7795  # routes back to tunnelled pods, one per pod address
REPLY_RULE_PRIORITY = 90  # `lookup REPLY_TABLE`, before main (and before other CNIs' rules)


class TunnelledPods(Protocol):
    """What the gateway side reads of a ``steering.TunnelPeers``."""

    @property
    def pods(self) -> Mapping[keys.IPAddress, keys.IPAddress]:
        """Address of a pod served here -> tunnel address of the node it runs on."""
        ...


def _comparable(element: Element) -> tuple[bytes, bytes | None, bytes | None, str | None]:
    return (element.key, element.key_end, element.data, element.comment)


def sync_elements(
    sock: NftSocket, wanted: Mapping[str, Iterable[Element]], *, prune: bool = True
) -> tuple[int, int]:
    """Make each named set hold exactly ``wanted`` (key, data and comment), in one transaction:
    what differs is deleted first, then added, so a map element that changes value never
    leaves its key unmapped. Without ``prune``, only what is missing is added. Returns (added,
    removed)."""
    removals: list[Change] = []
    additions: list[Change] = []
    for name, elements in wanted.items():
        want = {_comparable(e): e for e in elements}
        have = {_comparable(e): e for e in sock.dump(name)}
        stale = tuple(e for k, e in have.items() if k not in want) if prune else ()
        fresh = tuple(e for k, e in want.items() if k not in have)
        if stale:
            removals.append(Change(Op.DELETE, name, stale))
        if fresh:
            additions.append(Change(Op.ADD, name, fresh))
    if removals or additions:
        sock.apply(removals + additions)
    return (
        sum(len(c.elements) for c in additions),
        sum(len(c.elements) for c in removals),
    )


def tunnel_elements(
    local_version: int, pods: Mapping[keys.IPAddress, keys.IPAddress]
) -> tuple[dict[str, list[Element]], list[str]]:
    """The tunnel sets' elements: (worker tunnel address . pod address), raw, in the set for
    the pair of families, and each worker's address in the peers set of its family; pods of
    workers the tunnel cannot reach are named in notes."""
    wanted: dict[str, list[Element]] = {name: [] for name in skeleton.TUNNEL_SET_SPECS}
    notes: list[str] = []
    for pod, worker in sorted(pods.items(), key=lambda i: (i[0].version, i[0])):
        if worker.version != local_version:
            notes.append(f"pod {pod}: its node {worker} is not reachable over this tunnel")
            continue
        name = skeleton.tunnel_set_name(worker.version, pod.version)
        wanted[name].append(Element(key=worker.packed + pod.packed))
    for worker in sorted({w for w in pods.values() if w.version == local_version}):
        wanted[skeleton.tunnel_peers_set(worker.version)].append(Element(key=worker.packed))
    return wanted, notes


class GatewayTunnel:
    """The gateway side of the tunnel from worker nodes (only when the gateway runs with a node
    name): the device, the tunnel chains in the gateway's table (``skeleton.render_tunnel``),
    and the routes back to tunnelled pods.

    ``setup`` once the gateway's table exists (after ``NftDatapath.adopt``); it adopts what a
    previous run left. ``apply`` is idempotent: pods and their nodes from a ``TunnelPeers``
    become (a) elements of the sets the inner-source check looks up, (b) one route per pod
    address, ``via`` its node through the tunnel in ``reply_table``, which ``ip rule`` entries
    at ``rule_priority`` consult before main for packets from the uplink and this node's own
    (replies, and the gateway's own answers, go back to the pod's node), and (c) FDB and
    neighbour entries for those nodes. A new pod's route is in place before its packets are
    accepted; a gone pod's packets are refused before its route goes. ``remove`` uninstalls
    all of it. Forwarding and SNAT are the gateway's own rules: a tunnelled pod is a workload
    like any other. Synchronous, one caller at a time.
    """

    def __init__(
        self,
        tunnel: TunnelSettings,
        table: str,
        uplink: str,
        netns: str | None = None,
        *,
        reply_table: int = REPLY_TABLE,
        rule_priority: int = REPLY_RULE_PRIORITY,
    ) -> None:
        self.settings = tunnel
        self.table = table
        self.uplink = uplink
        self.netns = netns
        self.reply_table = reply_table
        self.rule_priority = rule_priority
        self.tunnel = Tunnel(tunnel, netns)
        self._sock: NftSocket | None = None
        self._lock = threading.Lock()

    def _rules(self) -> set[Rule]:
        # only what needs the reply table consults it: replies arriving on the uplink and this
        # node's own packets (DNS answers, ICMP errors). Packets from the tunnel skip it: one
        # table lookup fewer for each of them
        return {
            Rule(f, self.rule_priority, table=self.reply_table, iif=iif)
            for f in (4, 6)
            for iif in (self.uplink, "lo")
        }

    def setup(
        self, local: keys.IPAddress, dns_redirect: Sequence[tuple[keys.IPAddress, int]] = ()
    ) -> Changes:
        """Device for ``local``, tunnel chains (tunnelled DNS DNATed to ``dns_redirect``, at
        most one (address, port) per family), and the rule toward the reply table."""
        s = self.settings
        with self._lock:
            skeleton.load_tunnel(
                self.table, self.uplink, s.device, s.port, dns_redirect, self.netns
            )
            changes = self.tunnel.setup(local)
            changes += self.tunnel.sync_rules([self.rule_priority], self._rules())
            if self._sock is None:
                self._sock = call_in(self.netns, lambda: NftSocket(self.table))
            return changes

    def apply(self, peers: TunnelledPods) -> Changes:
        with self._lock:
            return self._apply(peers)

    def _apply(self, peers: TunnelledPods) -> Changes:
        local = self.tunnel.local
        if self._sock is None or local is None:
            raise TunnelError("GatewayTunnel.apply before setup")
        nodes = set(peers.pods.values()) | {local}
        changes = Changes()
        hops = {(w, f): next_hop(w, f) for w in set(peers.pods.values()) for f in (4, 6)}
        pods: dict[keys.IPAddress, keys.IPAddress] = {}
        routes: list[Route] = []
        for pod, worker in peers.pods.items():
            hop = hops[(worker, pod.version)]
            if pod in nodes:  # a node's own address (a host-network pod): never tunnelled
                changes.notes.append(f"pod {pod} has a node's address; not tunnelled")
            elif worker.version != local.version:
                changes.notes.append(f"pod {pod}: its node {worker} is not reachable here")
            elif hop is None:
                changes.notes.append(f"pod {pod}: no IPv{pod.version} next hop via {worker}")
            else:
                pods[pod] = worker
                routes.append(Route(self.reply_table, host_network(pod), hop))
        wanted, _ = tunnel_elements(local.version, pods)
        workers = set(pods.values())
        changes += self.tunnel.sync_peers(workers, prune=False)
        changes += self.tunnel.sync_routes([self.reply_table], routes, prune=False)
        added, removed = sync_elements(self._sock, wanted)
        changes.added += added
        changes.removed += removed
        changes += self.tunnel.sync_routes([self.reply_table], routes)
        changes += self.tunnel.sync_peers(workers)
        return changes

    def remove(self) -> None:
        """Uninstall: the tunnel chains and sets, the rule, the reply routes, the device."""
        with self._lock:
            skeleton.unload_tunnel(self.table, self.netns)
            self.tunnel.sync_rules([self.rule_priority], ())
            self.tunnel.sync_routes([self.reply_table], ())
            self.tunnel.remove()

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            self.tunnel.close()
