"""The daemon: follows a source, plans, applies to the datapath, supervises tasks, handles signals.

In: Settings and the parts ``app`` built from them. Out: a datapath kept in step with the source
until SIGTERM/SIGINT, after which it exits and leaves the kernel enforcing the last state
(nothing is removed on the way out). On a gateway node (``--node-name``), ``GatewayNode`` adds
the tunnel's end and, in manifests mode, decides which egress IPs this node holds.
Every long-running coroutine is a named task; if one dies, the daemon stops loudly.

Start-up checks what it needs before it touches the kernel (``preflight``: the network
namespace, the nft command, CAP_NET_ADMIN, the uplink; then whether the DNS addresses can be
bound) and turns what fails while starting (binding, adopting the table) into ``StartupError``,
whose message is one line for the operator. An upstream resolver that cannot be reached at
start does not stop it: it is demoted, as an unreachable upstream is at run time, and its
socket is opened again by the housekeeping until it can be.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import gc
import ipaddress
import logging
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from egressgw import metrics
from egressgw.contracts import Datapath, GatewayTunnel, Ownership, Source, StatusSink
from egressgw.datapath.addresses import IPAddress as AddressOnLink
from egressgw.datapath.addresses import UplinkAddresses
from egressgw.datapath.netlink import SOCKET_BUFFER_BYTES, NetlinkError
from egressgw.datapath.netns import call_in
from egressgw.datapath.skeleton import SkeletonError
from egressgw.datapath.tunnel import TunnelSettings
from egressgw.dns.interceptor import DnsSettings, Interceptor, PolicyView
from egressgw.dns.names import NamePolicy
from egressgw.dns.server import TCP_IN_FLIGHT, TCP_PER_SOURCE, DnsServer, udp_socket
from egressgw.explain import Explanation, Query, explain
from egressgw.identity import IdentityRegistry, IPAddress, WorkloadTable
from egressgw.plan import Plan, build
from egressgw.policy.model import EgressGateway, Snapshot
from egressgw.report import gateway_egress, to_json
from egressgw.steering import TunnelPeers, manifest_holders, tunnel_peers
from egressgw.web import Health, NotReady, Operator, make_app, serve

log = logging.getLogger("egressgw")
HOUSEKEEPING_INTERVAL_S = 5.0
COLLECT_INTERVAL_S = 1.0
RETRY_FIRST_S = 1.0  # a failed apply is tried again after this, doubling up to RETRY_MAX_S
RETRY_MAX_S = 30.0
CAP_NET_ADMIN = 12  # the capability's bit in /proc/self/status CapEff


TRIM_LEAST = 1024  # entries held at the least before a drop to a quarter calls for a trim


class Trimmer:
    """Gives free memory back once what a burst of traffic made the daemon remember has been
    dropped: a full collection empties the interpreter's free lists (what waits there to be
    reused keeps alive the 1 MiB arena of the small-object allocator it sits in), then glibc's
    ``malloc_trim`` hands the C heap's free pages back (the large tables of the caches and of
    the datapath's mirror were freed into it, which otherwise keeps them resident).

    When: after a drop that left nothing, or left a quarter of the most held since the last
    time (if that was ``least`` entries or more). Not under steady load, where what is freed
    is soon used again."""

    def __init__(self, least: int = TRIM_LEAST) -> None:
        self.least = least
        self.peak = 0  # the most entries held since the last trim
        self._malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)

    def due(self, dropped: int, held: int) -> bool:
        """Whether to trim now that ``dropped`` entries were dropped and ``held`` remain."""
        self.peak = max(self.peak, held + dropped)
        if not dropped or (held and (self.peak < self.least or 4 * held > self.peak)):
            return False
        self.peak = held
        return True

    def trim(self) -> None:
        """The C heap's part, from any thread."""
        if self._malloc_trim is not None:  # glibc's; other C libraries have no such call
            self._malloc_trim(0)


@contextlib.contextmanager
def collections_paused() -> Iterator[None]:
    """No automatic cyclic collection inside: for an apply, which allocates a plan and a diff
    of up to millions of objects that refcounting alone frees (tests/unit/test_reference_cycles
    .py), so the collections its allocations would trigger find nothing, yet each walks what
    the apply built so far; at 100,000 pods they were a third of the plan's time. The
    collection every second (``Daemon._collect_young``) goes on, being explicit."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class StartupError(RuntimeError):
    """The daemon could not start; the message is one line for the operator."""


class HoldAll:
    def holds(self, gateway: EgressGateway, address: IPAddress) -> bool:
        return True

    def update(self, gateways: Sequence[EgressGateway]) -> None:
        return None

    async def run(self, changed: Callable[[], None]) -> None:
        await asyncio.Event().wait()


@dataclass(frozen=True)
class Settings:
    uplink: str
    manifests: Path | None = None
    table: str = "egressgw"
    http_listen: tuple[str, int] | None = None
    dns_listen: tuple[tuple[str, int], ...] = ()
    upstreams: tuple[tuple[str, int], ...] = ()
    upstream_timeout_s: float = 1.0
    dns: DnsSettings = field(default_factory=DnsSettings)
    netns: str | None = None  # tests: run the datapath inside this namespace
    node_name: str = ""  # how reports and metrics name this node; empty: the host name
    netlink_buffer_bytes: int = SOCKET_BUFFER_BYTES  # asked for the nftables socket, per direction
    dns_tcp_per_source: int = TCP_PER_SOURCE  # DNS-over-TCP connections one source may hold
    dns_tcp_pipeline: int = TCP_IN_FLIGHT  # queries in flight per DNS-over-TCP connection
    tunnel: TunnelSettings = field(default_factory=TunnelSettings)  # with node_name only


class GatewayNode:
    """What ``--node-name`` adds to a gateway: its end of the tunnel and, in manifests mode,
    which egress IPs it holds (an ``Ownership``).

    Manifests mode (``manifests=True``): this node holds the egress IPs that
    ``steering.manifest_holders`` gives it. Manifests without any Node are read as before the
    tunnel existed: every egress IP is held and there is no tunnel. With Nodes but none named
    this node's name, nothing is held. Kubernetes mode: the Leases decide (``LeaseOwnership``)
    and ``others`` says who holds the rest.

    After every apply, ``sync`` gives the tunnel the pod addresses this node accepts
    (``steering.tunnel_peers``, from who holds what: this node exactly the IPs it put on its
    uplink, the others as ``others`` or the manifests say). The tunnel is built, told where
    the DNS it carries goes, and set up only once this node's Node has a tunnel address;
    until then nothing of it is touched.
    """

    def __init__(
        self,
        name: str,
        tunnel: Callable[[], GatewayTunnel],
        dns_listen: Sequence[tuple[str, int]] = (),
        *,
        manifests: bool,
        others: Callable[[], Mapping[IPAddress, str]] | None = None,
    ) -> None:
        self.name = name
        self.dns_listen = tuple(dns_listen)
        self.manifests = manifests
        self._make_tunnel = tunnel
        self._others = others
        self.tunnel: GatewayTunnel | None = None
        self.local: IPAddress | None = None  # the address the tunnel was set up with
        self.in_force: TunnelPeers | None = None
        self._holders: dict[IPAddress, str] = {}  # manifests mode: from the latest snapshot
        self._everything = True  # manifests without Nodes: hold every egress IP, no tunnel
        self._said: str | None = None

    # -- Ownership, for manifests mode --------------------------------------------------------
    def see(self, snapshot: Snapshot) -> None:
        """The snapshot about to be planned (before ``holds`` is asked)."""
        if not self.manifests:
            return
        self._everything = not snapshot.nodes
        self._holders = manifest_holders(snapshot)
        if self._everything:
            self._say(
                f"--node-name {self.name}: the manifests hold no Node, so this node holds every "
                "egress IP and there is no tunnel"
            )
        elif not any(node.name == self.name for node in snapshot.nodes):
            self._say(
                f"--node-name {self.name}: no Node of that name in the manifests; this node "
                "holds no egress IP"
            )
        else:
            self._say(None)

    def _say(self, line: str | None) -> None:
        if line is not None and line != self._said:
            log.warning("%s", line)
        self._said = line

    def holds(self, gateway: EgressGateway, address: IPAddress) -> bool:
        return self._everything or self._holders.get(address) == self.name

    def update(self, gateways: Sequence[EgressGateway]) -> None:
        return None

    async def run(self, changed: Callable[[], None]) -> None:
        await asyncio.Event().wait()  # the manifests change through snapshots

    # -- the tunnel ---------------------------------------------------------------------------
    def holders(self, held: Set[IPAddress]) -> dict[IPAddress, str]:
        """Egress IP -> holding node: this node exactly ``held``, the others as known."""
        known = self._holders if self.manifests else dict(self._others() if self._others else {})
        found = {a: n for a, n in known.items() if n != self.name}
        found.update(dict.fromkeys(held, self.name))
        return found

    def sync(self, snapshot: Snapshot, held: Set[IPAddress]) -> TunnelPeers | None:
        """Bring the tunnel in step with ``snapshot`` and the egress IPs held; the peers in
        force, or None without a tunnel. Raises what the tunnel raises."""
        if self.manifests and self._everything:
            return None
        peers = tunnel_peers(snapshot, self.name, self.holders(held))
        before = self.in_force
        for note in peers.notes:
            if before is None or note not in before.notes:
                log.warning("tunnel: %s", note)
        if peers.local is None:
            return None
        tunnel = self.tunnel
        if tunnel is None:
            tunnel = self.tunnel = self._make_tunnel()
        if self.local != peers.local:
            redirect = self.dns_redirect(peers.local)
            tunnel.setup(peers.local, redirect)
            self.local, before = peers.local, None
            log.info(
                "tunnel: set up at %s; the DNS it carries is answered at %s",
                peers.local,
                ", ".join(listen_label(str(a), p) for a, p in redirect)
                or "no address of this node (no --dns-listen of the tunnel's family): it is "
                "forwarded as any other traffic",
            )
        if before is None or before.pods != peers.pods:
            tunnel.apply(peers)
            was = before.pods if before is not None else {}
            log.info(
                "tunnel: accepting %d pod addresses from %d nodes (+%d -%d)",
                len(peers.pods),
                len(peers.peers),
                sum(1 for a, n in peers.pods.items() if was.get(a) != n),
                sum(1 for a, n in was.items() if peers.pods.get(a) != n),
            )
        self.in_force = peers
        metrics.TUNNEL_POD_ADDRESSES.set(len(peers.pods))
        metrics.TUNNEL_PEERS.set(len(peers.peers))
        return peers

    def dns_redirect(self, local: IPAddress) -> list[tuple[IPAddress, int]]:
        """Where the tunnel's DNS goes: the first ``--dns-listen`` address of each family, an
        unspecified one (0.0.0.0, ::) standing for ``local`` when it is of that family."""
        found: dict[int, tuple[IPAddress, int]] = {}
        for host, port in self.dns_listen:
            address = ipaddress.ip_address(host)
            if address.is_unspecified:
                if address.version != local.version:
                    continue
                address = local
            found.setdefault(address.version, (address, port))
        return [found[family] for family in sorted(found)]

    def close(self) -> None:
        if self.tunnel is not None:
            self.tunnel.close()


def listen_label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def has_capability(bit: int, status: Path = Path("/proc/self/status")) -> bool:
    """Whether this process holds capability ``bit`` (True when that cannot be read: the
    kernel has the last word then)."""
    try:
        text = status.read_text()
    except OSError:
        return True
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return True


def _interface_index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0


def check_uplink(uplink: str, netns: str | None) -> None:
    """Raise ``StartupError`` unless ``uplink`` exists (in ``netns``)."""
    where = f" in network namespace {netns}" if netns else ""
    try:
        found = call_in(netns, lambda: _interface_index(uplink))
    except OSError as exc:
        raise StartupError(f"--netns {netns}: cannot enter it: {exc.strerror or exc}") from None
    if not found:
        raise StartupError(f"--uplink {uplink}: no such interface{where} (`ip link` lists them)")


def check_host(netns: str | None) -> None:
    """Whether this host can run the datapath (in ``netns``): the namespace exists, the nft
    command is installed, and this process holds CAP_NET_ADMIN. Raises ``StartupError``."""
    if netns is not None and not Path("/run/netns", netns).exists():
        raise StartupError(
            f"--netns {netns}: no such network namespace (`ip netns list` lists them)"
        )
    if shutil.which("nft") is None:
        raise StartupError(
            "nftables not available: the nft command is not installed "
            "(Debian: apt-get install nftables)"
        )
    if not has_capability(CAP_NET_ADMIN):
        raise StartupError(
            "not permitted: nftables and the uplink's addresses need CAP_NET_ADMIN "
            "(run as root, or grant the NET_ADMIN and NET_RAW capabilities)"
        )


def preflight(settings: Settings) -> None:
    """What the daemon needs before it touches the kernel; ``StartupError`` names what is
    missing."""
    check_host(settings.netns)
    check_uplink(settings.uplink, settings.netns)


_BIND_REASONS = {
    errno.EADDRINUSE: "address already in use (another process listens there)",
    errno.EADDRNOTAVAIL: "no interface here has this address",
    errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
}


def bind_problem(flag: str, addresses: Sequence[tuple[str, int]], exc: OSError) -> StartupError:
    """One line for ``flag``'s addresses that could not be bound."""
    reason = _BIND_REASONS.get(exc.errno or 0) or (exc.strerror or str(exc)).lower()
    where = ", ".join(listen_label(host, port) for host, port in addresses)
    return StartupError(f"{flag} {where}: {reason}")


def probe_dns_listen(addresses: Sequence[tuple[str, int]]) -> None:
    """Bind each DNS address (UDP as the server does, then TCP) and let go at once, so an
    address that cannot be served is found before the kernel is touched."""
    for host, port in addresses:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            udp_socket(host, port).close()
            with socket.socket(family, socket.SOCK_STREAM) as tcp:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                tcp.bind((host, port))
        except OSError as exc:
            raise bind_problem("--dns-listen", [(host, port)], exc) from None


def adopt_problem(settings: Settings, exc: Exception) -> StartupError:
    """One line for what went wrong adopting the table."""
    text = str(exc)
    lines = text.splitlines() or [type(exc).__name__]
    first = next((line for line in lines if "Error" in line), lines[0])
    if isinstance(exc, SkeletonError):
        if "Operation not permitted" in text:
            return StartupError(
                "not permitted: nftables needs CAP_NET_ADMIN (run as root, or grant NET_ADMIN)"
            )
        if f"unexpected {settings.table}," in text:
            return StartupError(
                f"--table {settings.table}: nft reads this name as a keyword; choose another"
            )
        if any(s in text for s in ("not supported", "No such file or directory", "cache init")):
            return StartupError(
                "nftables not available in this kernel (needs nf_tables with inet tables, sets, "
                f"maps, NAT and reject): {first.strip()}"
            )
        return StartupError(f"nftables refused table {settings.table}: {first.strip()}")
    if isinstance(exc, LookupError):  # the uplink went away after the preflight
        return StartupError(f"--uplink {settings.uplink}: {exc.args[0] if exc.args else exc}")
    if isinstance(exc, PermissionError) or getattr(exc, "errno", None) == errno.EPERM:
        return StartupError(f"not permitted: {exc} (CAP_NET_ADMIN is needed)")
    return StartupError(f"could not adopt table {settings.table}: {lines[0]}")


def _addresses_text(addresses: Sequence[AddressOnLink]) -> str:
    return "[" + ",".join(str(a) for a in addresses) + "]"


class Supervisor:
    """Tasks that must all keep running: the first that stops (or fails) stops the program,
    as ``request_stop`` (SIGTERM, SIGINT) does."""

    def __init__(self) -> None:
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def alive(self) -> bool:
        return all(not t.done() for t in self._tasks)

    def request_stop(self) -> None:
        self._stop.set()

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stop.is_set():
            return
        exc = task.exception()
        log.critical("task %s stopped (%s); shutting down", task.get_name(), exc or "returned")
        self._stop.set()

    async def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _failed(self) -> bool:
        """Whether a task ended with an exception."""
        return any(not t.cancelled() and t.done() and t.exception() for t in self._tasks)


async def serve_http(
    listen: tuple[str, int] | None, app: Callable[[], web.Application], what: str
) -> web.AppRunner | None:
    """Serve ``app()`` on ``--http-listen`` (None: nothing); ``StartupError`` if it cannot bind."""
    if not listen:
        return None
    host, port = listen
    try:
        runner = await serve(app(), host, port)
    except OSError as exc:
        raise bind_problem("--http-listen", [(host, port)], exc) from None
    log.info("serving %s on %s", what, listen_label(host, port))
    return runner


class Daemon(Supervisor):
    """Keeps the datapath in step with the source; built by ``app.build_gateway``."""

    def __init__(
        self,
        settings: Settings,
        datapath: Datapath,
        source: Source,
        ownership: Ownership | None = None,
        status: StatusSink | None = None,
        interceptor: Interceptor | None = None,
        gateway_node: GatewayNode | None = None,
    ) -> None:
        self.settings = settings
        self.datapath = datapath
        self.source = source
        self.ownership: Ownership = ownership or HoldAll()
        self.status = status
        self.interceptor = interceptor
        self.gateway_node = gateway_node
        self.last_snapshot: Snapshot | None = None
        self._apply_lock = threading.Lock()
        self.registry = IdentityRegistry()
        self.workloads = WorkloadTable()
        self.held: set[IPAddress] = set()
        self.adopted = False
        self.applied_once = False
        self.apply_failure: str | None = None  # why the latest desired state is not in force
        self.last_plan: Plan | None = None
        super().__init__()
        self._addresses: UplinkAddresses | None = None
        self._dns: DnsServer | None = None
        self._trimmer = Trimmer()

    # -- status -------------------------------------------------------------------------------
    def not_ready_reason(self) -> str | None:
        if not self.adopted:
            return "datapath not adopted yet"
        if self.apply_failure is not None:
            return self.apply_failure
        if not self.source.synced.is_set() or not self.applied_once:
            detail = getattr(self.source, "not_ready_reason", None)  # e.g. which kinds are unlisted
            return (detail() if callable(detail) else None) or "desired state not loaded yet"
        return None

    # -- what operators read (web endpoints and /metrics) -----------------------------------
    @property
    def node(self) -> str:
        return self.settings.node_name or socket.gethostname()

    def _snapshot(self) -> Snapshot:
        snapshot = self.last_snapshot
        if snapshot is None:
            raise NotReady(self.not_ready_reason() or "desired state not loaded yet")
        return snapshot

    def egress_ips(self) -> dict[str, Any]:
        """Every gateway with its namespaces and egress IPs, whether this node holds them and
        which node does: on a gateway node as its tunnel knows it (the manifests' choice, or
        the Leases' holders), else this node for what it holds and nobody known for the rest."""
        snapshot = self._snapshot()
        held = frozenset(self.held)
        node = self.gateway_node
        holders = node.holders(held) if node is not None else dict.fromkeys(held, self.node)
        return to_json(gateway_egress(snapshot, lambda _g, a: a in held, holders=holders))

    def explain(self, query: Query) -> Explanation:
        return explain(self._snapshot(), query)

    def recent_denials(self) -> list[dict[str, object]]:
        if self.interceptor is None:
            return []
        return [{"time": r.time, **r.fields()} for r in list(self.interceptor.recent_denials)]

    def web_app(self) -> web.Application:
        kept = self.interceptor.settings.recent_denials if self.interceptor is not None else 0
        operator = Operator(self.egress_ips, self.explain, self.recent_denials, kept)
        return make_app(Health(self.alive, self.not_ready_reason), operator)

    def gateway_report(self) -> metrics.GatewayReport:
        """The kernel-derived metrics, read at scrape time (see ``metrics.GatewayCollector``)."""
        return metrics.gateway_report(
            self.node,
            self.last_plan,
            self.last_snapshot,
            frozenset(self.held),
            self.source.problems,
            self.datapath.learned_by_identity,
            self.datapath.counters if self.adopted else None,
        )

    # -- work ---------------------------------------------------------------------------------
    def adopt(self) -> None:
        started = time.perf_counter()
        found = self.datapath.adopt()
        self.registry = IdentityRegistry(found.identities)
        self.held = set(found.egress_ips)
        self._addresses = UplinkAddresses(self.settings.uplink, self.settings.netns)
        gc.freeze()  # the adopted mirror is long-lived; keep full collections off it
        self.adopted = True
        log.info(
            "adopted table %s: %d identities, %d static and %d learned elements, %d egress IPs "
            "(%.0f ms)",
            self.settings.table,
            len(found.identities),
            found.static,
            found.learned,
            len(found.egress_ips),
            (time.perf_counter() - started) * 1000,
        )

    def apply(self, snapshot: Snapshot) -> Plan:
        """Plan and apply one snapshot. Addresses are added before SNAT uses them, and removed
        only after nothing SNATs to them any more. Called from one worker thread at a time."""
        with self._apply_lock, collections_paused():
            plan = self._apply(snapshot)
        # The state just built lives until the next apply: move it out of the collector's way.
        # A full collection over a loaded datapath (~300k objects) otherwise stalls DNS answers
        # for 100+ ms; frozen, it costs nothing.
        gc.freeze()
        return plan

    def _apply(self, snapshot: Snapshot) -> Plan:
        assert self._addresses is not None
        started = time.perf_counter()
        if self.gateway_node is not None:
            self.gateway_node.see(snapshot)
        self.ownership.update(snapshot.gateways)
        plan = build(snapshot, self.registry, self.ownership.holds)
        self.last_snapshot = snapshot
        for note in plan.notes:
            log.warning("%s", note)
        wanted = set(plan.desired.egress_ips)
        previously = set(self.held)
        taken = self._addresses.sync(wanted | previously, previously)
        # Learned elements are decided again under the new plan in the same transaction; the
        # interceptor is handed the plan once it is the one in force in the kernel.
        view = PolicyView(plan.workloads, NamePolicy(plan.selections))
        interceptor = self.interceptor
        committed = (lambda: interceptor.offer(view)) if interceptor is not None else None
        result = self.datapath.reconcile(plan.desired, view.names, committed)
        released = self._addresses.sync(wanted, previously)
        added = taken.added + [a for a in released.added if a not in taken.added]
        removed = taken.removed + released.removed
        self.held = set(wanted)
        self.workloads = plan.workloads
        self.last_plan = plan
        elapsed = time.perf_counter() - started
        metrics.RECONCILE_SECONDS.observe(elapsed)
        metrics.DATAPATH_CHANGES.labels("add").inc(result.added)
        metrics.DATAPATH_CHANGES.labels("remove").inc(result.removed + result.learned_removed)
        metrics.LEARNED_REVOKED.inc(result.learned_removed)
        metrics.WORKLOADS.set(len(plan.workloads))
        metrics.IDENTITIES.set(len(plan.desired.identities))
        metrics.EGRESS_IPS_HELD.set(len(wanted))
        metrics.PLAN_NOTES.set(len(plan.notes))
        for namespace in {w.namespace for _, w in plan.workloads.items()}:
            # counters start at 0 for every namespace, so a first hit shows in increase()
            metrics.DNS_DENIALS.labels(namespace)
            metrics.DNS_CAP_HITS.labels(namespace, "name")
            metrics.DNS_CAP_HITS.labels(namespace, "identity")
        problems = self.source.problems()
        metrics.INVALID_MANIFESTS.set(len(problems))
        if self.status is not None:
            try:
                self.status.report(snapshot, plan, problems)
            except Exception:  # status is a report, never a reason to stop enforcing
                log.exception("could not report status")
        log.info(
            "applied: %d workloads, %d identities, %d egress IPs; +%d -%d elements, "
            "%d learned removed (%d narrower written), egress IPs +%s -%s (%.1f ms)",
            len(plan.workloads),
            len(plan.desired.identities),
            len(wanted),
            result.added,
            result.removed,
            result.learned_removed,
            result.learned_rewritten,
            _addresses_text(added),
            _addresses_text(removed),
            elapsed * 1000,
        )
        if self.gateway_node is not None:  # the egress IPs it routes for are in place now
            self.gateway_node.sync(snapshot, wanted)
        return plan

    async def _follow_source(self) -> None:
        """Apply each snapshot; a failed apply is tried again with backoff until it succeeds
        or a newer snapshot replaces it."""
        snapshots = aiter(self.source.snapshots())
        pending: asyncio.Task[Snapshot] | None = None
        try:
            snapshot = await anext(snapshots)
            while True:
                delay = RETRY_FIRST_S
                while not await self._try_apply(snapshot):
                    if pending is None:
                        pending = asyncio.ensure_future(anext(snapshots))
                    done, _ = await asyncio.wait({pending}, timeout=delay)
                    if done:
                        break  # a newer snapshot replaces the one that failed
                    metrics.APPLY_RETRIES.inc()
                    delay = min(delay * 2, RETRY_MAX_S)
                if pending is not None:
                    snapshot, pending = await pending, None
                else:
                    snapshot = await anext(snapshots)
        finally:
            if pending is not None:
                pending.cancel()

    async def _try_apply(self, snapshot: Snapshot) -> bool:
        try:
            await asyncio.to_thread(self.apply, snapshot)
        except Exception as exc:
            metrics.RECONCILE_ERRORS.inc()
            self.apply_failure = f"the desired state could not be applied ({exc}); retrying"
            log.exception("could not apply the new state; retrying with backoff")
            return False
        self.apply_failure = None
        self.applied_once = True
        if self._dns is not None:  # the first plan is in force: queries waited for it
            await self._dns.serve()
        return True

    async def _follow_ownership(self) -> None:
        loop = asyncio.get_running_loop()
        running: asyncio.Future[None] | None = None
        again = False

        def changed() -> None:
            nonlocal running, again
            if self.last_snapshot is None:
                return  # the first apply reads the holdings anyway
            if running is not None and not running.done():
                again = True  # the running apply may have read the old holdings
                return
            running = loop.run_in_executor(None, self._reapply, self.last_snapshot)
            running.add_done_callback(lambda _f: rerun())

        def rerun() -> None:
            nonlocal again
            if again:
                again = False
                changed()

        await self.ownership.run(changed)

    def _reapply(self, snapshot: Snapshot) -> None:
        try:
            self.apply(self.last_snapshot or snapshot)
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            log.exception("could not apply an egress IP ownership change")

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)
            dropped, held = self.datapath.forget_expired(), 0
            if self.interceptor is not None:
                dropped += self.interceptor.forget_expired()
                held = sum(self.interceptor.remembered().values())
                self.interceptor.upstream.reopen()  # those that could not be opened yet
            if self._trimmer.due(dropped, held):
                gc.collect()
                await asyncio.to_thread(self._trimmer.trim)

    async def _collect_young(self) -> None:
        """Answers and decisions the DNS path caches between applies are long-lived too. A
        full collection walks every object not frozen: over a few seconds of answers that
        stalled the replies behind it for 10 to 280 ms under load. Every second, the young
        generations are collected (cheap: they hold only what was allocated since) and the
        survivors frozen, so a full collection never has more than a second's worth to walk.
        The price: an object in a reference cycle that is alive at a freeze, or unreachable but
        not collected yet, is never reclaimed. So nothing the daemon does again and again may
        build a cycle (pyroute2's messages do: dumps and address listings are decoded with
        struct), which tests/unit/test_reference_cycles.py and its kernel twin check, and
        egressgw_gc_frozen_objects shows the count in production."""
        while True:
            await asyncio.sleep(COLLECT_INTERVAL_S)
            gc.collect(1)
            gc.freeze()

    async def _adopt(self) -> None:
        try:
            await asyncio.to_thread(self.adopt)
        except (SkeletonError, NetlinkError, LookupError, OSError) as exc:
            raise adopt_problem(self.settings, exc) from None

    async def _start_dns(self, interceptor: Interceptor) -> None:
        """The upstreams, then the DNS server (``self._dns``), its ports bound but unread until
        the first plan is in force: before, every workload would be an unknown source and get
        REFUSED (for seconds at a large cluster's start); this way its queries wait in the
        sockets' queues and are answered once the plan is taken."""
        # an upstream that cannot be reached logs its demotion, and the housekeeping tries it
        # again
        await interceptor.upstream.start()
        self._dns = DnsServer(
            interceptor,
            list(self.settings.dns_listen),
            tcp_per_source=self.settings.dns_tcp_per_source,
            tcp_in_flight=self.settings.dns_tcp_pipeline,
        )
        try:
            await self._dns.start(serving=False)
        except OSError as exc:  # taken since the probe
            raise bind_problem("--dns-listen", self.settings.dns_listen, exc) from None

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; ``StartupError`` if it cannot start."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        runner: web.AppRunner | None = None
        try:
            await asyncio.to_thread(preflight, self.settings)
            probe_dns_listen(self.settings.dns_listen)
            metrics.GATEWAY.bind(self.gateway_report)
            metrics.DNS_ADDRESS_CAPS.labels("name").set(self.settings.dns.max_addresses_per_name)
            metrics.DNS_ADDRESS_CAPS.labels("identity").set(
                self.settings.dns.max_addresses_per_identity
            )
            runner = await serve_http(
                self.settings.http_listen, self.web_app, "health, metrics and the operator API"
            )
            await self._adopt()
            if self.interceptor is not None:
                await self._start_dns(self.interceptor)
            self._spawn(self._follow_source(), "follow-source")
            self._spawn(self._follow_ownership(), "follow-ownership")
            self._spawn(self._housekeeping(), "housekeeping")
            self._spawn(self._collect_young(), "collect-young")
            await self._stop.wait()
        finally:
            await self._cancel_tasks()
            if self._dns is not None:
                await self._dns.close()
            if self.interceptor is not None:
                self.interceptor.upstream.close()
            if runner is not None:
                await runner.cleanup()
            metrics.GATEWAY.unbind()
            self.datapath.close()
            if self.gateway_node is not None:  # off the loop: pyroute2 runs a loop of its own
                await asyncio.to_thread(self.gateway_node.close)
            if self._addresses is not None:
                self._addresses.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("stopped; the datapath keeps enforcing the last state")
        return 1 if self._failed() else 0
