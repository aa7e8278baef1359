"""Which node holds each egress IP, read from the Leases: what a worker node's agent steers to.

In: the egress IP Leases in the lease namespace, as ``kube.leases.LeaseOwnership`` writes them
(label ``app.kubernetes.io/managed-by=egressgw``, annotation ``egressgw.io/egress-ip``, name
``lease_name(ip)``), followed by a ``Reflector`` thread (list, then watch), and a monotonic clock.
Out: ``holders()``, egress IP -> name of the node that holds it now, and from ``run`` one call of
``changed()`` on the event loop once the Leases are first listed (even if there are none), then
whenever that mapping changes: at once for a watch event, and at the moment a Lease expires with
no event at all (a check is scheduled for the earliest expiry). It never writes a Lease and may
not touch the datapath.

What counts as a holder (``HolderRecord``, ``holders_at``; time only arrives as ``now``):
- a Lease that names no one (released), a deleted Lease, and a Lease whose name is not
  ``lease_name`` of the IP it is annotated with (a stray copy) name no holder;
- otherwise the node named in ``spec.holderIdentity`` holds the IP until the record (holder,
  resourceVersion) has stayed the same for D/2 on this node's clock, D being the Lease's
  ``leaseDurationSeconds``. Why D/2, with no clock shared between nodes: a live holder renews
  every D/10, so four renewals in a row would have to go missing; and a holder gives the IP up
  D/2 after it sent its last confirmed renewal (``lease_machine``), which this node can only
  have seen after it was sent. So by the time the record expires here, its holder has stopped
  SNATing to the IP (or does so within its D/20 check interval): steering to it any longer would
  only have its gateway drop the traffic. No other node may take the Lease over before 0.75 D.
- A new record (a renewal, a takeover) counts again from the moment it is seen. A record seen
  first at start-up counts from then, so a holder that died before the agent started is
  followed for D/2 more: its traffic goes into a tunnel toward a node that forwards nothing, and
  never leaves with the worker's own address.

While the watch cannot reach the API server no renewal is seen, so every holder expires after
D/2 and the agent fails closed. That is deliberate: this node cannot tell a silent holder from a
silent API server (and a holder that has lost the API server gives its IPs up at D/2 too). When
only this node has lost it, its selected pods lose external traffic although their holder still
serves, until the next event or relist brings the records back.

``tests/kube/test_kube_agent.py`` checks the deadline with a fake clock, and with a short Lease
that nobody renews against the in-process API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kubernetes import client

from egressgw.identity import IPAddress
from egressgw.kube.leases import IP_ANNOTATION, MANAGED_BY, LeaseTiming, lease_name
from egressgw.kube.reflector import Key, Obj, Reflector, WatchSettings

log = logging.getLogger(__name__)
LEASE_API_VERSION = "coordination.k8s.io/v1"
COUNTS_FOR = 0.5  # of the Lease duration, after the record was first seen: the holder's give-up
RECHECK_S = 1.0  # ``run`` looks again at least this often, whatever the injected clock does


@dataclass(frozen=True)
class HolderRecord:
    """One egress IP's Lease as this node last saw it, times on this node's clock."""

    address: IPAddress
    holder: str  # spec.holderIdentity; "" when released
    resource_version: str
    duration_s: float  # spec.leaseDurationSeconds
    seen_at: float  # when this (holder, resourceVersion) was first seen

    @property
    def counts_until(self) -> float:
        """From then on the holder no longer counts (see the module docstring)."""
        return self.seen_at + self.duration_s * COUNTS_FOR

    def holds_at(self, now: float) -> bool:
        return bool(self.holder) and now < self.counts_until


def holders_at(records: Mapping[str, HolderRecord], now: float) -> dict[IPAddress, str]:
    """Egress IP -> holder, for every record whose holder counts at ``now``."""
    return {r.address: r.holder for r in records.values() if r.holds_at(now)}


def next_expiry(records: Mapping[str, HolderRecord], now: float) -> float | None:
    """The earliest moment after ``now`` at which a holder stops counting; None: none will."""
    due = [r.counts_until for r in records.values() if r.holds_at(now)]
    return min(due) if due else None


def read_lease(lease: Obj) -> tuple[IPAddress, str, str, float] | None:
    """(egress IP, holder or "", resourceVersion, duration) of an egress IP Lease as the API
    sends it; None for a Lease that is not one (no IP annotation, or not named after it)."""
    meta = lease.get("metadata") or {}
    spec = lease.get("spec") or {}
    annotation = (meta.get("annotations") or {}).get(IP_ANNOTATION)
    try:
        address = ipaddress.ip_address(annotation or "")
    except ValueError:
        return None
    if meta.get("name") != lease_name(address):
        return None
    duration = spec.get("leaseDurationSeconds")
    if not isinstance(duration, int | float) or duration <= 0:
        duration = LeaseTiming().duration_s
    holder = spec.get("holderIdentity") or ""
    return address, str(holder), str(meta.get("resourceVersion") or ""), float(duration)


class LeaseHolders:
    """Who holds each egress IP, for the agent; see the module docstring."""

    def __init__(
        self,
        api: client.ApiClient,
        lease_namespace: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        settings: WatchSettings | None = None,
    ) -> None:
        self.namespace = lease_namespace
        self.clock = clock
        self.synced = asyncio.Event()  # set by ``run`` once the Leases have been listed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._records: dict[str, HolderRecord] = {}  # by Lease name
        self._listed = False
        self._wake: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._thread: threading.Thread | None = None
        coordination = client.CoordinationV1Api(api)
        self.reflector = Reflector(
            "Lease",
            LEASE_API_VERSION,
            functools.partial(coordination.list_namespaced_lease, lease_namespace),
            self._replace,
            self._event,
            list_kwargs={"label_selector": f"{MANAGED_BY}=egressgw"},
            settings=settings or WatchSettings(),
        )

    # -- what the agent reads -------------------------------------------------------------------
    def holders(self) -> dict[IPAddress, str]:
        """Egress IP -> the node that holds it now; empty until the Leases are listed."""
        return self.holders_at(self.clock())

    def holders_at(self, now: float) -> dict[IPAddress, str]:
        with self._lock:
            return holders_at(self._records, now)

    def next_expiry(self, now: float) -> float | None:
        with self._lock:
            return next_expiry(self._records, now)

    def listed(self) -> bool:
        """Whether the Leases have been listed once (before that, ``holders()`` is empty)."""
        with self._lock:
            return self._listed

    def not_ready_reason(self) -> str | None:
        return None if self.listed() else "waiting for the first list of Lease"

    # -- reflector callbacks (watch thread) -----------------------------------------------------
    def _store(self, name: str, lease: Obj | None) -> None:
        read = None if lease is None else read_lease(lease)
        if read is None:
            self._records.pop(name, None)
            return
        address, holder, version, duration = read
        old = self._records.get(name)
        if old is not None and (old.address, old.holder, old.resource_version) == read[:3]:
            return  # the same record: it keeps counting from when it was first seen
        self._records[name] = HolderRecord(address, holder, version, duration, self.clock())

    def _replace(self, kind: str, leases: dict[Key, Obj]) -> None:
        names = {name for _, name in leases}
        with self._lock:
            for name in set(self._records) - names:
                self._store(name, None)
            for (_, name), lease in leases.items():
                self._store(name, lease)
            self._listed = True  # here, not in the reflector: the notify below must see it
        self._notify()

    def _event(self, kind: str, type_: str, lease: Obj) -> None:
        name = (lease.get("metadata") or {}).get("name") or ""
        with self._lock:
            self._store(name, None if type_ == "DELETED" else lease)
        self._notify()

    def _notify(self) -> None:
        wake = self._wake
        if wake is not None and not wake[0].is_closed():
            wake[0].call_soon_threadsafe(wake[1].set)

    # -- running --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the watch thread (idempotent). ``run`` calls it."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self.reflector.run, args=(self._stop,), name="watch-Lease", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """The watch thread ends at its next event or bookmark."""
        self._stop.set()

    async def run(self, changed: Callable[[], None]) -> None:
        """Follow the Leases until cancelled. ``changed()`` once they are first listed (even
        if there are none), then whenever ``holders()`` changes, an expiry included."""
        wake = asyncio.Event()
        self._wake = (asyncio.get_running_loop(), wake)
        self.start()
        last: dict[IPAddress, str] | None = None
        try:
            while True:
                timeout = RECHECK_S
                if self.listed():
                    now = self.clock()
                    current = self.holders_at(now)
                    if current != last:
                        if last is not None:
                            log.info("egress IP holders: %s", _describe(current))
                        last = current
                        self.synced.set()
                        changed()
                    due = self.next_expiry(now)
                    if due is not None:
                        timeout = min(timeout, max(0.0, due - now))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout)
                wake.clear()
        finally:
            self._wake = None
            self.stop()


def _describe(holders: Mapping[IPAddress, str]) -> str:
    if not holders:
        return "none"
    return ", ".join(f"{a} on {n}" for a, n in sorted(holders.items(), key=lambda i: str(i[0])))
