"""The agent on a worker node: steers this node's selected pods to their gateway nodes.

In: ``AgentSettings``; a ``Source`` of Snapshots (the pods on this node, the Namespaces, the
EgressGateways and the Nodes); who holds each egress IP (``EgressHolders``: the Leases; in
manifests mode there is none and ``steering.manifest_holders`` reads the snapshot); an
``AgentDatapath``; a clock. Out: the datapath kept in step with ``steering.agent_plan`` until
SIGTERM/SIGINT, one log line per change applied, and (with ``--http-listen``) /healthz, /readyz
and /metrics (``metrics.AgentReport``, read from the plan in force at scrape time).

The loop: a snapshot or a change of holders only records what is new and wakes the reconciler.
The reconciler computes the plan from the latest of both and, when it differs from the plan in
force, applies it in a worker thread; whatever arrives meanwhile is coalesced into its next
turn, so the event loop never waits for the kernel and a burst of changes costs one apply. A
failed apply leaves the previous plan in force (the datapath changes in one batch) and is tried
again after a backoff (``Backoff``), or at once when something new arrives.

Restart: nothing in the kernel is removed or replaced before the first plan is applied, and
that plan waits for the whole desired state: the first snapshot, the holders (Kubernetes: the
first read of the Leases) and this node's tunnel address (its Node). Until then what a previous
run left keeps steering; a Node that is not known is said once, and waited for. Stopping lets
go of the datapath's handles only: the kernel keeps steering as last applied.

It may not touch the kernel itself (the datapath does) nor build its parts (``app`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from egressgw import metrics
from egressgw.contracts import AgentDatapath, EgressHolders, Source
from egressgw.datapath.tunnel import TunnelSettings
from egressgw.policy.model import IPAddress, IPNetwork, Snapshot
from egressgw.runtime import Supervisor, check_host, serve_http
from egressgw.steering import AgentPlan, agent_plan, manifest_holders
from egressgw.web import Health, make_app

log = logging.getLogger("egressgw.agent")
Clock = Callable[[], float]
RETRY_FIRST_S = 1.0  # a failed apply is tried again after this, doubling up to RETRY_MAX_S
RETRY_MAX_S = 30.0


@dataclass(frozen=True)
class AgentSettings:
    node_name: str
    cluster_cidrs: tuple[IPNetwork, ...]  # pod, service and node networks: never steered
    dns_addresses: tuple[IPAddress, ...] = ()  # cluster DNS: queries to them are steered
    manifests: Path | None = None
    http_listen: tuple[str, int] | None = None
    tunnel: TunnelSettings = field(default_factory=TunnelSettings)
    table: str = "egressgw_agent"  # nftables table (inet family)
    netns: str | None = None  # tests and labs: the datapath lives in this network namespace


class Backoff:
    """Seconds to wait before a failed apply is tried again: ``first_s``, doubling with each
    failure in a row up to ``max_s``; ``first_s`` again after a success."""

    def __init__(self, first_s: float = RETRY_FIRST_S, max_s: float = RETRY_MAX_S) -> None:
        self.first_s, self.max_s = first_s, max_s
        self._next = first_s

    def failed(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.max_s)
        return delay

    def succeeded(self) -> None:
        self._next = self.first_s


@dataclass(frozen=True)
class Applied:
    """A plan in force, and the names of the nodes its next hops are (tunnel address -> name)."""

    plan: AgentPlan
    names: Mapping[IPAddress, str]


def dropped(plan: AgentPlan) -> list[tuple[str, int]]:
    """(gateway, family) of steered addresses that have no next hop: dropped on this node."""
    found = {(gateway, address.version) for address, gateway in plan.steered.items()}
    return sorted(key for key in found if key not in plan.next_hops)


def same_effect(a: AgentPlan, b: AgentPlan) -> bool:
    """Whether the two plans program the same kernel state (notes aside)."""
    return a.local == b.local and a.steered == b.steered and a.next_hops == b.next_hops


def change_line(
    before: AgentPlan | None, after: AgentPlan, names: Mapping[IPAddress, str], elapsed_s: float
) -> str:
    """The one line that says what an apply put in force."""
    was = before.steered if before is not None else {}
    added = sum(1 for a in after.steered if a not in was)
    removed = sum(1 for a in was if a not in after.steered)
    per_gateway = Counter(after.steered.values())
    steered = ", ".join(f"{g} {n}" for g, n in sorted(per_gateway.items()))
    hops = ", ".join(
        f"{gateway}/IPv{family} {names.get(address, '?')} {address}"
        for (gateway, family), address in sorted(after.next_hops.items())
    )
    drops = ", ".join(f"{gateway}/IPv{family}" for gateway, family in dropped(after))
    return (
        f"applied: {len(after.steered)} pod addresses steered"
        f" ({steered + '; ' if steered else ''}+{added} -{removed}); "
        f"next hops: {hops or 'none'}; dropped, no gateway node to send to: {drops or 'none'}; "
        f"local {after.local} ({elapsed_s * 1000:.1f} ms)"
    )


class Agent(Supervisor):
    """Keeps the agent's datapath in step with the desired state; built by ``app.build_agent``."""

    def __init__(
        self,
        settings: AgentSettings,
        datapath: AgentDatapath,
        source: Source,
        holders: EgressHolders | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.settings = settings
        self.datapath = datapath
        self.source = source
        self.holders = holders
        self.clock = clock
        self.snapshot: Snapshot | None = None
        self.holders_known = holders is None  # manifests mode: the snapshot says
        self.applied: Applied | None = None
        self.local: IPAddress | None = None  # the address the datapath was set up with
        self.waiting: str | None = None  # why the latest desired state is not applied
        self.failure: str | None = None  # why the latest apply failed
        self._notes: frozenset[str] = frozenset()  # the latest plan's notes, as logged
        self.backoff = Backoff()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._applying: asyncio.Future[bool] | None = None
        super().__init__()

    # -- the reconcile step (one caller at a time; a worker thread in ``run``) ---------------
    def plan(self) -> AgentPlan | None:
        """The plan for the latest snapshot and holders; None while either is not known."""
        snapshot = self.snapshot
        if snapshot is None or not self.holders_known:
            return None
        holders = manifest_holders(snapshot) if self.holders is None else self.holders.holders()
        return agent_plan(snapshot, self.settings.node_name, holders)

    def reconcile(self) -> bool:
        """Apply the plan for the latest desired state if it programs something other than the
        plan in force; whether it applied one. Raises what the datapath raises, leaving the
        plan in force as it was."""
        snapshot = self.snapshot
        plan = self.plan()
        if snapshot is None or plan is None:
            if snapshot is not None:
                self._wait("waiting for the first read of the egress IP holders", logging.INFO)
            return False
        if plan.local is None:
            self._wait(
                f"Node {plan.node} is not in the desired state, or has no InternalIP: waiting "
                "for it; nothing is changed in the kernel meanwhile"
            )
            return False
        if self.waiting is not None:
            log.info("desired state complete: steering from %s", plan.local)
            self.waiting = None
        for note in plan.notes:
            if note not in self._notes:
                log.warning("%s", note)
        self._notes = frozenset(plan.notes)
        applied = self.applied
        previous = applied.plan if applied is not None else None
        names = {n.tunnel_address: n.name for n in snapshot.nodes if n.tunnel_address}
        if previous is not None and same_effect(previous, plan) and self.local == plan.local:
            self.applied = Applied(plan, names)
            return False
        started = self.clock()
        if self.local != plan.local:
            self.datapath.setup(plan.local)
            self.local = plan.local
        self.datapath.apply(plan)
        elapsed = self.clock() - started
        self.applied = Applied(plan, names)
        metrics.AGENT_APPLIES.inc()
        metrics.AGENT_APPLY_SECONDS.observe(elapsed)
        log.info("%s", change_line(previous, plan, names, elapsed))
        return True

    def _wait(self, reason: str, level: int = logging.WARNING) -> None:
        if reason != self.waiting:
            log.log(level, "%s", reason)
            self.waiting = reason

    # -- what operators read --------------------------------------------------------------------
    def not_ready_reason(self) -> str | None:
        if self.failure is not None:
            return self.failure
        if self.waiting is not None:
            return self.waiting
        if self.applied is None:
            detail = getattr(self.source, "not_ready_reason", None)  # e.g. kinds not listed
            return (detail() if callable(detail) else None) or "desired state not loaded yet"
        return None

    def report(self) -> metrics.AgentReport:
        """The plan in force, for a scrape (see ``metrics.AgentCollector``)."""
        applied = self.applied
        if applied is None:
            return metrics.AgentReport()
        plan = applied.plan
        hops = [
            metrics.NextHop(gateway, family, applied.names.get(address, str(address)))
            for (gateway, family), address in plan.next_hops.items()
        ]
        closed: dict[tuple[str, int], bool] = {
            (g, a.version): (g, a.version) not in plan.next_hops for a, g in plan.steered.items()
        }
        try:
            dropped_packets: int | None = self.datapath.dropped()
        except Exception:  # e.g. the table is gone: the rest of the scrape still stands
            log.debug("could not read the dropped packets counter", exc_info=True)
            dropped_packets = None
        steered = dict(Counter(plan.steered.values()))
        return metrics.AgentReport(steered, hops, closed, dropped_packets)

    def web_app(self) -> web.Application:
        return make_app(Health(self.alive, self.not_ready_reason))

    # -- the loop -------------------------------------------------------------------------------
    def poke(self) -> None:
        """Something changed: reconcile soon (from any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    async def _follow_source(self) -> None:
        async for snapshot in self.source.snapshots():
            self.snapshot = snapshot
            self._wake.set()

    async def _follow_holders(self, holders: EgressHolders) -> None:
        def changed() -> None:
            self.holders_known = True
            self.poke()

        await holders.run(changed)

    async def _reconcile(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._applying = loop.run_in_executor(None, self.reconcile)
            try:
                await asyncio.shield(self._applying)
            except Exception as exc:
                metrics.AGENT_APPLY_ERRORS.inc()
                delay = self.backoff.failed()
                self.failure = f"the steering plan could not be applied ({exc}); retrying"
                log.exception(
                    "could not apply the steering plan; the previous one stays in force; "
                    "trying again in %.0f s, or at the next change",
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                self._wake.set()
            else:
                self.failure = None
                self.backoff.succeeded()

    async def steer(self) -> int:
        """Follow the source and the holders and reconcile until ``request_stop``; 1 if a task
        failed. (``run`` is this with the host checked, HTTP served and signals handled.)"""
        self._loop = asyncio.get_running_loop()
        self._spawn(self._follow_source(), "follow-source")
        if self.holders is not None:
            self._spawn(self._follow_holders(self.holders), "follow-holders")
        self._spawn(self._reconcile(), "reconcile")
        try:
            await self._stop.wait()
        finally:
            await self._cancel_tasks()
            if self._applying is not None:  # an apply under way finishes before the handles go
                await asyncio.gather(self._applying, return_exceptions=True)
        return 1 if self._failed() else 0

    async def run(self) -> int:
        """Steer until SIGTERM/SIGINT; ``runtime.StartupError`` if it cannot start."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        runner: web.AppRunner | None = None
        try:
            await asyncio.to_thread(check_host, self.settings.netns)
            if not self.settings.dns_addresses:
                log.warning(
                    "no --dns-address: the pods' DNS is not steered, so their gateway's "
                    "interceptor never learns what they resolve"
                )
            metrics.AGENT.bind(self.report)
            runner = await serve_http(self.settings.http_listen, self.web_app, "health and metrics")
            result = await self.steer()
        finally:
            if runner is not None:
                await runner.cleanup()
            metrics.AGENT.unbind()
            # off the loop: pyroute2's synchronous sockets run an event loop of their own
            await asyncio.to_thread(self.datapath.close)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("stopped; the kernel keeps steering as last applied")
        return result
