"""Which egress IPs this node holds, decided with coordination.k8s.io/v1 Leases.

In: the gateways of each snapshot (``update``), this node's name and labels, the Lease API.
Out: ``holds(gateway, address)`` for the planner, ``changed()`` calls when that answer changes,
and ``holders()`` (egress IP -> node) for the EgressGateway status.

One Lease per egress IP (``egressgw-<ip>`` in the lease namespace). A node competes for an IP
only while it is eligible: its Node's labels match the gateway's nodeSelector (no nodeSelector:
every gateway node). Timing, with D the Lease duration (``leaseDurationSeconds``):

- the holder renews every D/10, and gives the IP up (the daemon removes the address and stops
  SNATing to it) once D/2 has passed since the last renewal that the API server confirmed,
  measured from when that request was sent, on its own monotonic clock;
- a candidate takes an IP over once the Lease record (holder, resourceVersion) has not changed
  for W = D - 2*(D/10) - D/20 = 0.75 D on *its* monotonic clock (as client-go does: no clock
  needs to agree between nodes). W > D/2 leaves D/4 for the old holder to have removed the
  address before the new one adds it; a killed holder is replaced after at most
  W + 2 * D/20 = 0.85 D (plus one re-apply), inside the Lease duration;
- a free Lease (missing or released) is taken after (IPs already held) * D/10, so two nodes
  starting together spread the IPs instead of one taking all;
- every write is a create (409 AlreadyExists: someone else won) or a replace carrying the
  resourceVersion read (409 Conflict: someone else changed it first): never two holders.

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
from egressgw.policy.model import EgressGateway

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


@dataclass(frozen=True)
class LeaseTiming:
    duration_s: int = 10

    @property
    def tick_s(self) -> float:
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


@dataclass
class _Held:
    renewed_sent_at: float  # monotonic time the last confirmed renewal was sent


@dataclass
class _Seen:
    record: tuple[str, str]  # (holder, resourceVersion)
    since: float


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
    ) -> None:
        self.coordination = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.node_name = node_name
        self.node_labels = node_labels
        self.timing = timing or LeaseTiming()
        self.on_holders_changed = on_holders_changed
        self.stats = LeaseStats()
        self._lock = threading.RLock()
        self._tick_lock = threading.Lock()
        self._wanted: dict[IPAddress, EgressGateway] = {}
        self._held: dict[IPAddress, _Held] = {}
        self._view: frozenset[IPAddress] = frozenset()  # what the last apply was told
        self._seen: dict[IPAddress, _Seen] = {}
        self._free_since: dict[IPAddress, float] = {}
        self._to_release: set[IPAddress] = set()
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
        with self._lock:
            self._drop_unwanted()
            self._view = frozenset(self._held)

    def holders(self) -> dict[IPAddress, str]:
        """Egress IP -> the node named in its Lease, for every IP a Lease exists for."""
        with self._lock:
            return dict(self._holders)

    async def run(self, changed: Callable[[], None]) -> None:
        """Renew, take over and give up until cancelled; ``changed`` when holding changes."""
        watchdog = asyncio.create_task(self._watchdog(changed), name="lease-deadlines")
        try:
            while True:
                started = time.monotonic()
                holders_before = self.holders()
                await asyncio.to_thread(self.tick)
                if self._view_stale():
                    changed()
                if self.on_holders_changed is not None and self.holders() != holders_before:
                    self.on_holders_changed()
                elapsed = time.monotonic() - started
                await asyncio.sleep(max(0.0, self.timing.tick_s - elapsed))
        finally:
            watchdog.cancel()

    # -- local deadlines (no API needed) --------------------------------------------------------
    async def _watchdog(self, changed: Callable[[], None]) -> None:
        while True:
            if self.expire(time.monotonic()) or self._view_stale():
                changed()
            await asyncio.sleep(self.timing.tick_s)

    def _view_stale(self) -> bool:
        with self._lock:
            return frozenset(self._held) != self._view

    def expire(self, now: float) -> list[IPAddress]:
        """Give up every IP whose last confirmed renewal is older than D/2."""
        with self._lock:
            late = [
                a
                for a, h in self._held.items()
                if now - h.renewed_sent_at > self.timing.give_up_after_s
            ]
            for address in late:
                del self._held[address]
                self.stats.given_up += 1
                self._note(
                    f"gave up {address}: no confirmed renewal"
                    f" for {self.timing.give_up_after_s:.1f} s"
                )
            return late

    def _drop_unwanted(self) -> None:
        labels = self.node_labels()
        for address in list(self._held):
            gateway = self._wanted.get(address)
            if gateway is None or not self._eligible(gateway, labels):
                del self._held[address]
                self._to_release.add(address)
                self._note(f"releasing {address}: no longer an egress IP this node may hold")

    def _note(self, message: str) -> None:
        log.info("lease: %s", message)
        self.stats.history.append(message)
        del self.stats.history[:-100]

    @staticmethod
    def _eligible(gateway: EgressGateway, labels: Mapping[str, str] | None) -> bool:
        if labels is None:
            return False
        return gateway.node_selector is None or gateway.node_selector.matches(labels)

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
        with self._lock:
            self._holders = holders
            # released one round after being dropped, so the address is gone before another
            # node can take the Lease
            release = sorted(self._to_release, key=lambda a: (a.version, a))
            self._drop_unwanted()
            wanted = dict(self._wanted)
        for address in release:
            self._release(address, by_name.get(lease_name(address)))
        labels = self.node_labels()
        for address in sorted(wanted, key=lambda a: (a.version, a)):
            gateway = wanted[address]
            with self._lock:
                self._evaluated.add(address)
            if self._eligible(gateway, labels):
                self._compete(address, gateway, by_name.get(lease_name(address)))

    def _compete(
        self, address: IPAddress, gateway: EgressGateway, lease: client.V1Lease | None
    ) -> None:
        now = time.monotonic()
        holder = lease.spec.holder_identity if lease is not None and lease.spec else None
        if lease is None or not holder:
            with self._lock:
                free_since = self._free_since.setdefault(address, now)
                spread = len(self._held) * self.timing.renew_every_s
            if now - free_since >= spread:
                self._acquire(address, gateway, lease, now)
            return
        self._free_since.pop(address, None)
        if holder == self.node_name:
            with self._lock:
                held = self._held.get(address)
            if held is None or now - held.renewed_sent_at >= self.timing.renew_every_s:
                self._renew(address, gateway, lease, now, taking=False)
            return
        with self._lock:
            if address in self._held:  # someone else is the holder now: we lost it
                del self._held[address]
                self.stats.lost += 1
                self._note(f"lost {address} to {holder}")
        record = (holder, _meta(lease).resource_version or "")
        seen = self._seen.get(address)
        if seen is None or seen.record != record:
            self._seen[address] = _Seen(record, now)
        elif now - seen.since >= self.timing.take_over_after_s:
            self._note(
                f"{address}: Lease held by {holder} unchanged for {now - seen.since:.1f} s;"
                " taking over"
            )
            self._renew(address, gateway, lease, now, taking=True)

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

    def _acquire(
        self, address: IPAddress, gateway: EgressGateway, lease: client.V1Lease | None, now: float
    ) -> None:
        if lease is not None:  # released by its holder: take it with its resourceVersion
            self._renew(address, gateway, lease, now, taking=True)
            return
        body = client.V1Lease(
            metadata=client.V1ObjectMeta(
                name=lease_name(address),
                namespace=self.namespace,
                labels={MANAGED_BY: "egressgw", GATEWAY_LABEL: gateway.name},
                annotations={IP_ANNOTATION: str(address)},
            ),
            spec=self._spec(True, None),
        )
        try:
            self.coordination.create_namespaced_lease(
                self.namespace, body, _request_timeout=self.timing.request_timeout_s
            )
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.stats.conflicts += 1
            return
        self._took(address, now)

    def _renew(
        self,
        address: IPAddress,
        gateway: EgressGateway,
        lease: client.V1Lease,
        now: float,
        *,
        taking: bool,
    ) -> None:
        lease.spec = self._spec(taking, lease)
        _meta(lease).labels = {**(_meta(lease).labels or {}), GATEWAY_LABEL: gateway.name}
        if not self._replace(lease):
            self.stats.conflicts += 1
            return  # someone else wrote first; the next round reads who
        if taking:
            self._took(address, now)
        else:
            with self._lock:
                if address not in self._held:
                    self._note(f"holding {address} (Lease already ours)")
                    self.stats.acquired += 1
                self._held[address] = _Held(now)

    def _replace(self, lease: client.V1Lease) -> bool:
        """Write a Lease back over the resourceVersion it was read with; False when someone
        else changed or deleted it first (409 or 404), which is never an error here."""
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
            return False
        return True

    def _took(self, address: IPAddress, now: float) -> None:
        with self._lock:
            self._held[address] = _Held(now)
            self._seen.pop(address, None)
            self._free_since.pop(address, None)
            self.stats.acquired += 1
            self._holders[address] = self.node_name
        self._note(f"acquired {address}")

    def _release(self, address: IPAddress, lease: client.V1Lease | None) -> None:
        if (
            lease is not None
            and lease.spec is not None
            and lease.spec.holder_identity == self.node_name
        ):
            lease.spec.holder_identity = None
            self._replace(lease)  # if someone else wrote first, it is not ours to release
        with self._lock:
            self._to_release.discard(address)
