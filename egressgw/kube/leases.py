"""Which egress IPs this node holds, decided with coordination.k8s.io/v1 Leases.

In: the gateways of each snapshot (``update``), this node's name and labels, the Lease API and a
monotonic clock. Out: ``holds(gateway, address)`` for the planner, ``changed()`` calls when that
answer changes, and ``holders()`` (egress IP -> node) for the EgressGateway status.

One Lease per egress IP (``egressgw-<ip>`` in the lease namespace). A node competes for an IP
only while it is eligible: its Node's labels match the gateway's nodeSelector (no nodeSelector:
every gateway node). When to create, renew, take over, release or give up, and why there are
never two holders, is decided by ``lease_machine``; this module only translates: it lists the
Leases, hands the machine what it read and the clock's ``now``, performs the writes the machine
asks for and reports each outcome back. It makes no timing decision of its own.

Nothing is released on shutdown: the daemon leaves its addresses in place across a restart, and
a restarted daemon finds itself the holder and carries on.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from egressgw.identity import IPAddress
from egressgw.kube.lease_machine import (
    WRITES,
    Action,
    Create,
    Drop,
    GiveUp,
    LeaseMachine,
    LeaseTiming,
    Lost,
    Observed,
    Release,
    Renew,
    TakeOver,
)
from egressgw.policy.model import EgressGateway

__all__ = ["LeaseOwnership", "LeaseStats", "LeaseTiming", "lease_name"]

log = logging.getLogger(__name__)
MANAGED_BY = "app.kubernetes.io/managed-by"
GATEWAY_LABEL = "egressgw.io/gateway-name"
IP_ANNOTATION = "egressgw.io/egress-ip"


def _meta(lease: client.V1Lease) -> client.V1ObjectMeta:
    assert lease.metadata is not None  # the API server always sends metadata
    return lease.metadata


def lease_name(address: IPAddress) -> str:
    """A DNS-subdomain name for the IP's Lease (IPv6 exploded, so it never ends in '-')."""
    text = address.exploded if address.version == 6 else str(address)
    return "egressgw-" + text.replace(".", "-").replace(":", "-")


def observe(lease: client.V1Lease | None) -> Observed:
    """What the machine needs of a Lease: its record and whether it exists."""
    if lease is None:
        return Observed()
    holder = lease.spec.holder_identity if lease.spec is not None else None
    return Observed(holder or None, _meta(lease).resource_version or "", exists=True)


@dataclass
class LeaseStats:
    acquired: int = 0
    lost: int = 0
    given_up: int = 0
    conflicts: int = 0
    api_failures: int = 0
    history: list[str] = field(default_factory=list)


class LeaseOwnership:
    """``Ownership`` for the daemon in Kubernetes mode."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        node_name: str,
        node_labels: Callable[[], Mapping[str, str] | None],
        timing: LeaseTiming | None = None,
        on_holders_changed: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.coordination = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.node_name = node_name
        self.node_labels = node_labels
        self.timing = timing or LeaseTiming()
        self.on_holders_changed = on_holders_changed
        self.clock = clock
        self.stats = LeaseStats()
        self._lock = threading.RLock()  # guards the machine and everything below
        self._tick_lock = threading.Lock()
        self._machine = LeaseMachine(node_name, self.timing)
        self._wanted: dict[IPAddress, EgressGateway] = {}
        self._view: frozenset[IPAddress] = frozenset()  # what the last apply was told
        self._evaluated: set[IPAddress] = set()
        self._holders: dict[IPAddress, str] = {}

    # -- the Ownership protocol -----------------------------------------------------------------
    def holds(self, gateway: EgressGateway, address: IPAddress) -> bool:
        with self._lock:
            wanted = self._wanted.get(address)
            return address in self._view and wanted is not None and wanted.name == gateway.name

    def update(self, gateways: Sequence[EgressGateway]) -> None:
        """Called by each apply before it plans. New IPs get one Lease round first, so a
        restarted daemon keeps the IPs it still holds instead of dropping them for a moment."""
        wanted: dict[IPAddress, EgressGateway] = {}
        for gateway in sorted(gateways, key=lambda g: g.name):
            for address in gateway.egress_ips:
                wanted.setdefault(address, gateway)
        with self._lock:
            self._wanted = wanted
            unknown = set(wanted) - self._evaluated
        if unknown:
            self.tick()
        labels = self.node_labels()
        with self._lock:
            eligible = self._eligible_addresses(labels)
            self._act(self._machine.drop(self._wanted.keys(), eligible))
            self._view = self._machine.held

    def holders(self) -> dict[IPAddress, str]:
        """Egress IP -> the node named in its Lease, for every IP a Lease exists for."""
        with self._lock:
            return dict(self._holders)

    async def run(self, changed: Callable[[], None]) -> None:
        """Renew, take over and give up until cancelled; ``changed`` when holding changes."""
        watchdog = asyncio.create_task(self._watchdog(changed), name="lease-deadlines")
        try:
            while True:
                started = self.clock()
                holders_before = self.holders()
                await asyncio.to_thread(self.tick)
                if self._view_stale():
                    changed()
                if self.on_holders_changed is not None and self.holders() != holders_before:
                    self.on_holders_changed()
                elapsed = self.clock() - started
                await asyncio.sleep(max(0.0, self.timing.tick_s - elapsed))
        finally:
            watchdog.cancel()

    # -- local deadlines (no API needed) --------------------------------------------------------
    async def _watchdog(self, changed: Callable[[], None]) -> None:
        while True:
            if self.expire(self.clock()) or self._view_stale():
                changed()
            await asyncio.sleep(self.timing.tick_s)

    def _view_stale(self) -> bool:
        with self._lock:
            return self._machine.held != self._view

    def expire(self, now: float) -> list[IPAddress]:
        """Give up every IP whose last confirmed renewal is older than D/2."""
        with self._lock:
            late = self._machine.expire(now)
            self._act(late)
            return [action.address for action in late]

    def _eligible_addresses(self, labels: Mapping[str, str] | None) -> frozenset[IPAddress]:
        if labels is None:
            return frozenset()
        return frozenset(
            address
            for address, gateway in self._wanted.items()
            if gateway.node_selector is None or gateway.node_selector.matches(labels)
        )

    def _act(self, actions: Sequence[Action]) -> None:
        """Count and log the local actions: nothing to write for them."""
        for action in actions:
            if isinstance(action, GiveUp):
                self.stats.given_up += 1
                self._note(f"gave up {action.address}: {action.reason}")
            elif isinstance(action, Lost):
                self.stats.lost += 1
                self._note(f"lost {action.address}: {action.reason}")
            elif isinstance(action, Drop):
                self._note(f"releasing {action.address}: {action.reason}")

    def _note(self, message: str) -> None:
        log.info("lease: %s", message)
        self.stats.history.append(message)
        del self.stats.history[:-100]

    # -- one round against the API --------------------------------------------------------------
    def tick(self) -> None:
        """Read every egress IP Lease once and act on each; stops at the first API failure."""
        with self._tick_lock:
            try:
                self._tick()
            except ApiException as exc:
                self.stats.api_failures += 1
                log.warning("lease round failed: HTTP %s %s", exc.status, exc.reason)
            except Exception as exc:  # API away: only local deadlines apply until it is back
                self.stats.api_failures += 1
                log.warning("lease round failed: %s: %s", type(exc).__name__, exc)

    def _tick(self) -> None:
        leases = self.coordination.list_namespaced_lease(
            self.namespace,
            label_selector=f"{MANAGED_BY}=egressgw",
            _request_timeout=self.timing.request_timeout_s,
        )
        by_name = {_meta(lease).name or "": lease for lease in leases.items}
        holders: dict[IPAddress, str] = {}
        for lease in leases.items:
            annotation = (_meta(lease).annotations or {}).get(IP_ANNOTATION)
            if annotation and lease.spec is not None and lease.spec.holder_identity:
                try:
                    holders[ipaddress.ip_address(annotation)] = lease.spec.holder_identity
                except ValueError:
                    continue
        labels = self.node_labels()
        with self._lock:
            self._holders = holders
            wanted = dict(self._wanted)
            found = {
                address: by_name[lease_name(address)]
                for address in self._machine.addresses | wanted.keys()
                if lease_name(address) in by_name
            }
            actions = self._machine.decide(
                self.clock(),
                wanted.keys(),
                self._eligible_addresses(labels),
                {address: observe(lease) for address, lease in found.items()},
            )
            self._act(actions)
            writes = [a for a in actions if isinstance(a, WRITES)]
            self._evaluated.update(wanted.keys() - {a.address for a in writes})
        for action in writes:
            self._write(action, found.get(action.address), wanted.get(action.address))
            with self._lock:
                self._evaluated.add(action.address)

    def _write(
        self, action: Action, lease: client.V1Lease | None, gateway: EgressGateway | None
    ) -> None:
        """Perform one write the machine asked for and report how it went."""
        address = action.address
        if isinstance(action, Create):
            assert gateway is not None  # only wanted IPs are created
            ok, sent_at = self._create(address, gateway)
        else:
            assert lease is not None and lease.spec is not None  # the machine saw the Lease
            if isinstance(action, Release):
                lease.spec.holder_identity = None
            else:
                assert gateway is not None  # only wanted IPs are renewed or taken
                if isinstance(action, TakeOver):
                    self._note(f"{address}: {action.reason}; taking over")
                lease.spec = self._spec(isinstance(action, TakeOver), lease)
                _meta(lease).labels = {**(_meta(lease).labels or {}), GATEWAY_LABEL: gateway.name}
            ok, sent_at = self._replace(lease)
        with self._lock:
            if not ok:
                self._machine.conflicted(address)
                if not isinstance(action, Release):  # not ours to release: no contest
                    self.stats.conflicts += 1
                return
            started = self._machine.confirmed(address, sent_at)
            if isinstance(action, Create | TakeOver):
                self._holders[address] = self.node_name
            if started:
                self.stats.acquired += 1
                if isinstance(action, Renew):
                    self._note(f"holding {address} (Lease already ours)")
                else:
                    self._note(f"acquired {address}")

    def _spec(self, taking: bool, lease: client.V1Lease | None) -> client.V1LeaseSpec:
        stamp = datetime.now(UTC)
        old = lease.spec if lease is not None and lease.spec is not None else None
        transitions = (old.lease_transitions or 0) if old is not None else 0
        acquired = old.acquire_time if old is not None and not taking else None
        return client.V1LeaseSpec(
            holder_identity=self.node_name,
            lease_duration_seconds=self.timing.duration_s,
            acquire_time=acquired or stamp,
            renew_time=stamp,
            lease_transitions=transitions + (1 if taking and old is not None else 0),
        )

    def _create(self, address: IPAddress, gateway: EgressGateway) -> tuple[bool, float]:
        """Create the Lease naming this node; False when it exists already (409)."""
        body = client.V1Lease(
            metadata=client.V1ObjectMeta(
                name=lease_name(address),
                namespace=self.namespace,
                labels={MANAGED_BY: "egressgw", GATEWAY_LABEL: gateway.name},
                annotations={IP_ANNOTATION: str(address)},
            ),
            spec=self._spec(True, None),
        )
        sent_at = self.clock()
        try:
            self.coordination.create_namespaced_lease(
                self.namespace, body, _request_timeout=self.timing.request_timeout_s
            )
        except ApiException as exc:
            if exc.status != 409:
                raise
            return False, sent_at
        return True, sent_at

    def _replace(self, lease: client.V1Lease) -> tuple[bool, float]:
        """Write a Lease back over the resourceVersion it was read with; False when someone
        else changed or deleted it first (409 or 404), which is never an error here."""
        sent_at = self.clock()
        try:
            self.coordination.replace_namespaced_lease(
                _meta(lease).name or "",
                self.namespace,
                lease,
                _request_timeout=self.timing.request_timeout_s,
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise
            return False, sent_at
        return True, sent_at
