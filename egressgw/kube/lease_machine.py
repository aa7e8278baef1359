"""The Lease state machine: when this node creates, renews, takes over, releases or gives up an
egress IP.

In: this node's identity and ``LeaseTiming``; each round, ``now`` (this node's monotonic clock, in
seconds), the egress IPs that exist (``wanted``), those this node may hold (``eligible``: its
labels match the gateway's nodeSelector) and one ``Observed`` Lease record per egress IP; then the
outcome of each write (``confirmed`` with the time the request was sent, or ``conflicted``).
Between rounds, ``expire(now)`` for the local deadline and ``drop`` when the IPs change.
Out: ``Action`` values, each with a reason to log, and ``held``, the egress IPs this node may
have configured right now. Pure: no Kubernetes client, no threads, no clock reads; time only
arrives as ``now`` or ``sent_at``. ``LeaseOwnership`` turns the actions into API calls.

One Lease per egress IP. Timing, with D the Lease duration (``leaseDurationSeconds``):

- the holder renews every D/10, and gives the IP up (the daemon removes the address and stops
  SNATing to it) once D/2 has passed since the last renewal that the API server confirmed,
  measured from when that request was sent, on its own monotonic clock;
- a candidate takes an IP over once the Lease record (holder, resourceVersion) has not changed
  for W = D - 2*(D/10) - D/20 = 0.75 D on *its* monotonic clock (as client-go does: no clock
  needs to agree between nodes). W > D/2 leaves D/4 for the old holder to have removed the
  address before the new one adds it; a killed holder is replaced after at most
  W + 2 * D/20 = 0.85 D (plus one re-apply), inside the Lease duration;
- a free Lease (missing or released) is taken after (IPs already held) * D/10, so two nodes
  starting together spread the IPs instead of one taking all; an IP this round is already
  taking counts as held;
- an IP this node may no longer hold is dropped at once and its Lease released one round
  later, so the address is gone before another node can take the Lease;
- every write is a create (409 AlreadyExists: someone else won) or a replace carrying the
  resourceVersion read (409 Conflict: someone else changed it first): never two holders.

Why never two holders: a takeover that succeeds carried the resourceVersion of a record this
node first saw at ``since``, so nothing was written to the Lease after that record was read.
The old holder's last confirmed renewal is the write that made the record (or an earlier one),
sent before ``since``; it gave up D/2 after sending it, and the takeover is sent W = 0.75 D
after ``since``. The D/4 between the two absorbs rate drift between the clocks and the D/20
the daemon may take to notice the deadline. A released Lease names no one only after its
holder dropped the address a round earlier. ``tests/unit/test_lease_machine.py`` checks this
with drifting clocks, slow and lost API responses, label changes and killed nodes.

It may not read the clock, sleep, call the API or log: everything it decides is returned.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from egressgw.identity import IPAddress


@dataclass(frozen=True)
class LeaseTiming:
    """Every interval follows from the Lease duration, in seconds."""

    duration_s: int = 10

    @property
    def tick_s(self) -> float:
        """How often a round runs and the local deadlines are checked: D/20."""
        return self.duration_s / 20

    @property
    def renew_every_s(self) -> float:
        return self.duration_s / 10

    @property
    def give_up_after_s(self) -> float:
        return self.duration_s / 2

    @property
    def take_over_after_s(self) -> float:
        return self.duration_s - 2 * self.renew_every_s - self.tick_s

    @property
    def request_timeout_s(self) -> float:
        return self.duration_s / 5


@dataclass(frozen=True)
class Observed:
    """One egress IP's Lease as the last read returned it (``Observed()``: there is none)."""

    holder: str | None = None  # spec.holderIdentity; None when released
    resource_version: str = ""
    exists: bool = False


NO_LEASE = Observed()


@dataclass(frozen=True)
class Action:
    address: IPAddress
    reason: str


class Create(Action):
    """Write: create the missing Lease naming this node."""


class Renew(Action):
    """Write: replace the Lease, which names this node, with a fresh renewTime."""


class TakeOver(Action):
    """Write: replace the Lease, which names another node or none, naming this node."""


class Release(Action):
    """Write: replace the Lease, which names this node, naming none."""


class GiveUp(Action):
    """Local: stop using the address, no renewal was confirmed in time."""


class Lost(Action):
    """Local: stop using the address, the Lease names another node."""


class Drop(Action):
    """Local: stop using the address, this node may no longer hold it; Release follows."""


WRITES = (Create, Renew, TakeOver, Release)


@dataclass
class AddressState:
    """What the machine remembers about one egress IP, times on this node's clock."""

    renewal_sent_at: float | None = None  # last confirmed write sent at; None: not held
    seen: tuple[str, str] | None = None  # another node's record (holder, resourceVersion)
    seen_since: float = 0.0
    free_since: float | None = None
    release_due: bool = False  # dropped: release the Lease in a later round
    writing: type[Action] | None = None  # the write of this round awaiting its outcome


def _order(address: IPAddress) -> tuple[int, IPAddress]:
    return (address.version, address)


class LeaseMachine:
    """The decisions of one node, for every egress IP; see the module docstring."""

    def __init__(self, identity: str, timing: LeaseTiming) -> None:
        self.identity = identity
        self.timing = timing
        self._states: dict[IPAddress, AddressState] = {}

    @property
    def held(self) -> frozenset[IPAddress]:
        return frozenset(a for a, s in self._states.items() if s.renewal_sent_at is not None)

    @property
    def addresses(self) -> frozenset[IPAddress]:
        """Every egress IP the machine remembers something about."""
        return frozenset(self._states)

    def decide(
        self,
        now: float,
        wanted: AbstractSet[IPAddress],
        eligible: AbstractSet[IPAddress],
        observed: Mapping[IPAddress, Observed],
    ) -> list[Action]:
        """One round: give up what is late, drop what may no longer be held, release what was
        dropped before, then compete for each eligible IP in address order.

        ``observed`` has the Lease of every egress IP that has one (a missing entry: none). A
        write whose outcome is not reported before the next round counts as failed."""
        actions: list[Action] = list(self.expire(now))
        releasing = sorted((a for a, s in self._states.items() if s.release_due), key=_order)
        actions += self.drop(wanted, eligible)
        for state in self._states.values():
            state.writing = None
        for address in releasing:
            if observed.get(address, NO_LEASE).holder == self.identity:
                actions.append(self._write(Release(address, "this node may no longer hold it")))
            else:
                self._states[address].release_due = False
        for address in [a for a, s in self._states.items() if a not in wanted]:
            state = self._states[address]
            if state.renewal_sent_at is None and not state.release_due:
                del self._states[address]
        held = len(self.held)
        for address in sorted(eligible & wanted, key=_order):
            if address in releasing:
                continue  # this round's read is older than the release: decide next round
            for action in self._compete(now, address, observed.get(address, NO_LEASE), held):
                actions.append(action)
                if isinstance(action, Lost):
                    held -= 1
                elif address not in self.held:  # Create, TakeOver or Renew of our own Lease
                    held += 1
        return actions

    def expire(self, now: float) -> list[GiveUp]:
        """Give up every IP whose last confirmed renewal was sent more than D/2 ago."""
        limit = self.timing.give_up_after_s
        late: list[GiveUp] = []
        for address in sorted(self.held, key=_order):
            state = self._states[address]
            assert state.renewal_sent_at is not None
            if now - state.renewal_sent_at > limit:
                state.renewal_sent_at = None
                late.append(GiveUp(address, f"no confirmed renewal for {limit:.1f} s"))
        return late

    def drop(self, wanted: AbstractSet[IPAddress], eligible: AbstractSet[IPAddress]) -> list[Drop]:
        """Stop holding what this node may no longer hold; its Lease is released next round."""
        dropped: list[Drop] = []
        for address in sorted(self.held - (eligible & wanted), key=_order):
            state = self._states[address]
            state.renewal_sent_at = None
            state.release_due = True
            why = (
                "no longer an egress IP"
                if address not in wanted
                else "this node no longer matches the gateway's nodeSelector"
            )
            dropped.append(Drop(address, why))
        return dropped

    def confirmed(self, address: IPAddress, sent_at: float) -> bool:
        """The API applied this round's write for ``address``, sent at ``sent_at``. True when
        this node now holds an IP it did not hold before."""
        state = self._states.get(address)
        if state is None or state.writing is None:
            return False
        writing, state.writing = state.writing, None
        if writing is Release:
            state.release_due = False
            return False
        started = state.renewal_sent_at is None
        state.renewal_sent_at = max(sent_at, state.renewal_sent_at or sent_at)
        state.seen = None
        state.free_since = None
        return started

    def conflicted(self, address: IPAddress) -> None:
        """Someone else wrote the Lease first (409, or 404 for a replace): nothing changes here,
        the next round reads who holds it."""
        state = self._states.get(address)
        if state is None or state.writing is None:
            return
        if state.writing is Release:
            state.release_due = False  # no longer ours to release
        state.writing = None

    def _write(self, action: Action) -> Action:
        self._states.setdefault(action.address, AddressState()).writing = type(action)
        return action

    def _compete(self, now: float, address: IPAddress, lease: Observed, held: int) -> list[Action]:
        state = self._states.setdefault(address, AddressState())
        timing = self.timing
        if not lease.holder:
            state.seen = None
            if state.free_since is None:
                state.free_since = now
            free_for = now - state.free_since
            if free_for < held * timing.renew_every_s:
                return []  # spread: a node holding k IPs waits k * D/10
            if not lease.exists:
                return [self._write(Create(address, "no Lease yet"))]
            why = f"Lease released, free for {free_for:.1f} s"
            return [self._write(TakeOver(address, why))]
        state.free_since = None
        if lease.holder == self.identity:
            if state.renewal_sent_at is None:
                return [self._write(Renew(address, "the Lease names this node already"))]
            if now - state.renewal_sent_at >= timing.renew_every_s:
                return [self._write(Renew(address, "renewal due"))]
            return []
        actions: list[Action] = []
        if state.renewal_sent_at is not None:
            state.renewal_sent_at = None
            actions.append(Lost(address, f"the Lease names {lease.holder}"))
        record = (lease.holder, lease.resource_version)
        if state.seen != record:
            state.seen, state.seen_since = record, now
        elif now - state.seen_since >= timing.take_over_after_s:
            why = f"Lease held by {lease.holder} unchanged for {now - state.seen_since:.1f} s"
            actions.append(self._write(TakeOver(address, why)))
        return actions
