"""The worker agent end to end in Kubernetes mode: the in-process API server, the agent as
``app.build_agent`` builds it, and its real kernel datapath in a network namespace.

Network (unique namespace names, both removed afterwards, also on failure; nothing is done in
the root namespace, the agent's datapath lives in the worker's namespace through ``netns``):

    worker  eth0 198.51.100.1 ---- eth0 198.51.100.11 (gw-a), 198.51.100.12 (gw-b)  gateways
            egw0, table inet egressgw_agent, routing tables 7801..

The API server holds the Nodes worker-a (this agent's), worker-b (another worker) and the
gateway nodes gw-a and gw-b, the Namespace payments, the EgressGateway payments (egress IP
203.0.113.10) and that IP's Lease, written by a ``LeaseOwnership`` per gateway node as the
gateways write it. The test changes the API and reads the worker's kernel over netlink (the
agent's nftables sets and its routing tables) until the change shows: a pod created on this
node, the pod relabelled out of the gateway and back, its Namespace relabelled out and back, the
pod deleted, the Lease taken over by the other gateway node, and the Lease left to expire (the
gateway's traffic is then dropped on the worker). A pod of another node is never steered.

Each latency is printed (target: within 1 s); the assertions only bound it generously.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from egressgw.agent import AgentSettings
from egressgw.app import KubeSettings, WorkerAgent, build_agent
from egressgw.datapath import keys
from egressgw.datapath.agent import AGENT_TABLE, SteeringSettings
from egressgw.datapath.netlink import NetlinkError, NftSocket
from egressgw.datapath.netns import call_in
from egressgw.datapath.tunnel import RtnlReader, Rule
from egressgw.kube.api import api_client
from egressgw.kube.holders import LeaseHolders
from egressgw.kube.leases import LeaseOwnership, LeaseTiming, lease_name
from egressgw.policy.model import EgressGateway, IPAddress, LabelSelector
from egressgw.testing.apiserver import FakeApiServer, kubeconfig
from tests.conftest import require_kernel, unique_name

pytestmark = pytest.mark.kernel
Obj = dict[str, Any]
A = ipaddress.ip_address
SEEN_WITHIN_S = 5.0  # generous bound; the target, printed, is 1 s
POLL_S = 0.005
LEASE_NS = "egressgw-system"
LEASE_S = 4  # the agent counts a holder for 2 s after each renewal it sees
WORKER, OTHER_WORKER, GW_A, GW_B = "worker-a", "worker-b", "gw-a", "gw-b"
WORKER_IP, OTHER_WORKER_IP = A("198.51.100.1"), A("198.51.100.2")
GW_A_IP, GW_B_IP = A("198.51.100.11"), A("198.51.100.12")
EGRESS_IP = A("203.0.113.10")
API_0, API_1 = A("192.0.2.10"), A("192.0.2.11")  # pods on this node
FOREIGN = {A("192.0.2.108"), A("192.0.2.109")}  # pods of the same project on worker-b
GATEWAY_LABELS = {"egressgw.io/gateway": "true"}
STEERING = SteeringSettings()
GATEWAY = EgressGateway(
    "payments",
    LabelSelector((("project", "payments"),)),
    LabelSelector((("app", "api"),)),
    egress_ips=(EGRESS_IP,),
    node_selector=LabelSelector(tuple(GATEWAY_LABELS.items())),
)
SETTINGS = AgentSettings(
    node_name=WORKER,
    cluster_cidrs=(ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("198.51.100.0/24")),
    dns_addresses=(A("198.51.100.250"),),
)


# -- objects ----------------------------------------------------------------------------------


def node(name: str, address: IPAddress, labels: Mapping[str, str] | None = None) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": dict(labels or {})},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": str(address)},
                {"type": "Hostname", "address": name},
            ],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def namespace(project: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "payments", "labels": {"project": project}},
    }


def pod(node_name: str, name: str, address: IPAddress, app: str = "api") -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "payments", "labels": {"app": app}},
        "spec": {"nodeName": node_name, "containers": [{"name": "app", "image": "example"}]},
        "status": {"phase": "Running", "podIP": str(address), "podIPs": [{"ip": str(address)}]},
    }


def gateway() -> Obj:
    return {
        "apiVersion": "egressgw.io/v1alpha1",
        "kind": "EgressGateway",
        "metadata": {"name": GATEWAY.name},
        "spec": {
            "namespaceSelector": {"matchLabels": {"project": "payments"}},
            "podSelector": {"matchLabels": {"app": "api"}},
            "egressIPs": [str(EGRESS_IP)],
            "nodeSelector": {"matchLabels": GATEWAY_LABELS},
        },
    }


# -- the worker's kernel, read over netlink ---------------------------------------------------


@dataclass(frozen=True)
class Steering:
    """What the worker's kernel steers, as read back."""

    steered: Mapping[IPAddress, int]  # pod address -> the mark of its gateway
    routable: frozenset[int]  # marks of gateways with a next hop
    marks: Mapping[str, int]  # gateway -> its mark
    routes: Mapping[int, IPAddress]  # routing table -> next hop of its default route
    peers: frozenset[IPAddress]  # holders the tunnel accepts packets from

    def next_hop(self, gateway: str) -> IPAddress | None:
        """The node a gateway's IPv4 traffic is sent to; None if it is not routed."""
        mark = self.marks.get(gateway)
        if mark is None or mark not in self.routable:
            return None
        return self.routes.get(STEERING.table(STEERING.slot(mark)))

    def steers(self, address: IPAddress, gateway: str) -> bool:
        mark = self.marks.get(gateway)
        return mark is not None and self.steered.get(address) == mark

    def failed_closed(self, address: IPAddress, gateway: str) -> bool:
        """The pod is still marked for its gateway, and that mark is neither routable (nft
        drops it) nor routed (the blackhole rule behind would drop it)."""
        mark = self.marks.get(gateway)
        return (
            mark is not None
            and self.steers(address, gateway)
            and mark not in self.routable
            and STEERING.table(STEERING.slot(mark)) not in self.routes
        )


class WorkerKernel:
    """Netlink handles inside the worker's namespace; remembers every address ever steered."""

    def __init__(self, netns: str) -> None:
        self.nft = call_in(netns, lambda: NftSocket(AGENT_TABLE))
        self.rtnl = RtnlReader(netns)
        self.ever_steered: set[IPAddress] = set()

    def close(self) -> None:
        self.nft.close()
        self.rtnl.close()

    def read(self) -> Steering | None:
        """The agent's state in the kernel; None while its table does not exist."""
        try:
            dumped = {name: self.nft.dump(name) for name in ("steered4", "routable4", "gateways")}
            peers = self.nft.dump("peers4")
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        steered: dict[IPAddress, int] = {}
        for element in dumped["steered4"]:
            assert element.data is not None
            steered[keys.parse_address(element.key)] = keys.parse_mark(element.data)
        self.ever_steered.update(steered)
        routes = {
            route.table: keys.parse_address(route.gateway)
            for route in self.rtnl.routes(4)
            if route.table in STEERING.tables and route.dst_len == 0 and route.gateway
        }
        return Steering(
            steered=steered,
            routable=frozenset(keys.parse_mark(e.key) for e in dumped["routable4"]),
            marks={e.comment: keys.parse_mark(e.key) for e in dumped["gateways"] if e.comment},
            routes=routes,
            peers=frozenset(keys.parse_address(e.key) for e in peers),
        )

    def rules(self) -> list[Rule]:
        return self.rtnl.rules(4)


# -- gateway nodes' Lease writers -------------------------------------------------------------


class SkewedClock:
    """Monotonic time plus an offset the test moves: a gateway node's own clock."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset_s


class Renewing:
    """A gateway node's Lease rounds on a thread at its tick interval, as ``LeaseOwnership.run``
    does, until ``stop`` (which returns once no write is under way any more)."""

    def __init__(self, ownership: LeaseOwnership) -> None:
        self.ownership = ownership
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"renew-{ownership.node_name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.ownership.timing.tick_s):
            self.ownership.tick()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "a Lease round did not end"


def stored_at(api: FakeApiServer, holder: str) -> float:
    """The moment the API server stores the egress IP's Lease naming ``holder`` (call it before
    that write)."""
    store, key = api.store, (LEASE_NS, lease_name(EGRESS_IP))

    def named() -> bool:
        lease = store.objects["leases"].get(key) or {}
        return bool((lease.get("spec") or {}).get("holderIdentity") == holder)

    with store.cond:
        assert not named(), f"the Lease already named {holder}"
        assert store.cond.wait_for(named, SEEN_WITHIN_S), f"no Lease named {holder}"
    return time.monotonic()


# -- fixtures ---------------------------------------------------------------------------------


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


@pytest.fixture
def worker_netns() -> Iterator[str]:
    """The worker's namespace, its node address on a veth to a namespace holding both gateway
    nodes' addresses; both removed afterwards, also on failure."""
    require_kernel()
    tag = unique_name("egka")
    worker, gateways = f"{tag}-w", f"{tag}-g"
    try:
        for ns in (worker, gateways):
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
            ip(ns, "link", "set", "lo", "up")
        ip(worker, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", gateways)
        ip(worker, "addr", "add", f"{WORKER_IP}/24", "dev", "eth0")
        for address in (GW_A_IP, GW_B_IP):
            ip(gateways, "addr", "add", f"{address}/24", "dev", "eth0")
        for ns in (worker, gateways):
            ip(ns, "link", "set", "eth0", "up")
        yield worker
    finally:
        for ns in (worker, gateways):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer(bookmark_interval_s=0.2)
    server.start()
    for obj in (
        node(WORKER, WORKER_IP),
        node(OTHER_WORKER, OTHER_WORKER_IP),
        node(GW_A, GW_A_IP, GATEWAY_LABELS),
        node(GW_B, GW_B_IP, GATEWAY_LABELS),
        namespace("payments"),
        gateway(),
        pod(WORKER, "api-0", API_0),
        pod(OTHER_WORKER, "api-9", A("192.0.2.109")),
    ):
        server.put(obj)
    try:
        yield server
    finally:
        server.stop()


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Run:
    """The agent under test, the worker's kernel, and the latencies measured."""

    api: FakeApiServer
    agent: WorkerAgent
    task: asyncio.Task[int]
    kernel: WorkerKernel
    latencies: dict[str, float] = field(default_factory=dict)

    async def read(self) -> Steering | None:
        if self.task.done():
            raise AssertionError(f"the agent stopped: {self.task.result()}")
        return await asyncio.to_thread(self.kernel.read)

    async def seen_at(self, check: Callable[[Steering], bool], what: str, since: float) -> float:
        """The moment the kernel was first seen to show ``check``; AssertionError if it does
        not within ``SEEN_WITHIN_S`` of ``since``."""
        while True:
            seen = await self.read()
            at = time.monotonic()
            if seen is not None and check(seen):
                return at
            if at - since > SEEN_WITHIN_S:
                raise AssertionError(f"not in the kernel within {SEEN_WITHIN_S} s: {what}: {seen}")
            await asyncio.sleep(POLL_S)

    async def until(self, check: Callable[[Steering], bool], what: str, since: float) -> float:
        """Seconds from ``since`` until the kernel shows ``check``, recorded and printed."""
        return self.record(what, await self.seen_at(check, what, since) - since)

    def record(self, what: str, latency_s: float) -> float:
        self.latencies[what] = latency_s
        print(f"the agent followed {what} in {latency_s * 1000:.0f} ms")
        return latency_s


def test_the_agent_follows_pods_labels_and_holders_into_the_kernel_within_a_second(
    api: FakeApiServer, worker_netns: str, tmp_path: Path
) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(kubeconfig(api.url))
    leases = api_client(path)
    gw_a = LeaseOwnership(leases, LEASE_NS, GW_A, lambda: GATEWAY_LABELS, LeaseTiming(LEASE_S))
    clock_b = SkewedClock()
    gw_b = LeaseOwnership(
        leases, LEASE_NS, GW_B, lambda: GATEWAY_LABELS, LeaseTiming(LEASE_S), clock=clock_b
    )
    gw_a.update([GATEWAY])  # creates the Lease naming gw-a
    assert gw_a.holders() == {EGRESS_IP: GW_A}
    # built outside the event loop, as the command line does: pyroute2 runs a loop of its own
    worker = build_agent(
        dataclasses.replace(SETTINGS, netns=worker_netns), KubeSettings(WORKER, path, LEASE_NS)
    )
    kernel = WorkerKernel(worker_netns)
    renewing = [Renewing(gw_a)]
    try:
        latencies = asyncio.run(_follow(api, worker, kernel, gw_b, clock_b, renewing))
    finally:
        for renewal in renewing:
            renewal.stop()
        kernel.close()
    assert FOREIGN.isdisjoint(kernel.ever_steered), "a pod of another node was steered"
    width = max(map(len, latencies))
    print("\nlatencies (target 1 s):")
    for what, latency in latencies.items():
        print(f"  {what:<{width}}  {latency * 1000:7.1f} ms")


async def _follow(
    api: FakeApiServer,
    worker: WorkerAgent,
    kernel: WorkerKernel,
    gw_b: LeaseOwnership,
    clock_b: SkewedClock,
    renewing: list[Renewing],
) -> dict[str, float]:
    run = Run(api, worker, asyncio.create_task(worker.run()), kernel)
    try:
        started = time.monotonic()
        await run.until(
            lambda s: s.steered.keys() == {API_0} and s.next_hop("payments") == GW_A_IP,
            "the start (first plan applied)",
            started,
        )
        await _pods(api, run)
        await _takeover(gw_b, clock_b, renewing, run)
        await _expiry(renewing, run)
        assert Rule(
            4, STEERING.rule_priority + 1, fwmask=STEERING.mark_mask, blackhole=True, invert=True
        ) in await asyncio.to_thread(kernel.rules)
    finally:
        worker.agent.request_stop()
        result = await asyncio.wait_for(run.task, SEEN_WITHIN_S)
    assert result == 0
    return run.latencies


async def _pods(api: FakeApiServer, run: Run) -> None:
    """Pods created, relabelled and deleted on this node, and their Namespace relabelled."""
    started = time.monotonic()
    api.put(pod(OTHER_WORKER, "api-8", A("192.0.2.108")))  # another node's: never steered
    api.put(pod(WORKER, "api-1", API_1))
    await run.until(lambda s: s.steers(API_1, "payments"), "a pod created on its node", started)

    started = time.monotonic()
    api.put(pod(WORKER, "api-1", API_1, app="batch"))
    await run.until(
        lambda s: API_1 not in s.steered and s.steers(API_0, "payments"),
        "a pod relabelled out of its gateway",
        started,
    )
    started = time.monotonic()
    api.put(pod(WORKER, "api-1", API_1))
    await run.until(lambda s: s.steers(API_1, "payments"), "a pod relabelled back", started)

    started = time.monotonic()
    api.put(namespace("none"))
    await run.until(lambda s: not s.steered, "a Namespace relabelled out", started)
    started = time.monotonic()
    api.put(namespace("payments"))
    await run.until(
        lambda s: s.steered.keys() == {API_0, API_1} and s.next_hop("payments") == GW_A_IP,
        "a Namespace relabelled back",
        started,
    )

    started = time.monotonic()
    api.delete("Pod", "api-1", "payments")
    await run.until(lambda s: s.steered.keys() == {API_0}, "a pod deleted", started)


async def _takeover(
    gw_b: LeaseOwnership, clock_b: SkewedClock, renewing: list[Renewing], run: Run
) -> None:
    """gw-a falls silent; gw-b takes its Lease over, then renews it. Measured from the moment
    the API server stored the takeover, watching the kernel while gw-b's Lease round (a list,
    then the replace) is still under way."""
    renewing.pop().stop()
    await asyncio.to_thread(gw_b.update, [GATEWAY])  # gw-b starts counting gw-a's last record
    clock_b.offset_s = gw_b.timing.take_over_after_s  # which then stays unchanged long enough
    stored = asyncio.create_task(asyncio.to_thread(stored_at, run.api, GW_B))
    started = time.monotonic()
    takeover = asyncio.create_task(asyncio.to_thread(gw_b.tick))
    seen = await run.seen_at(
        lambda s: s.next_hop("payments") == GW_B_IP and s.peers == {GW_B_IP},
        "a change of egress IP holder",
        started,
    )
    await takeover
    assert gw_b.holders() == {EGRESS_IP: GW_B}, gw_b.stats.history
    renewing.append(Renewing(gw_b))
    run.record("a change of egress IP holder (from the Lease write)", seen - await stored)
    print(f"(gw-b's Lease round, over HTTP, took {(time.monotonic() - started) * 1000:.0f} ms)")


async def _expiry(renewing: list[Renewing], run: Run) -> None:
    """gw-b stops renewing: at the Lease's deadline on the agent's clock the gateway's traffic
    is failed closed (measured from that deadline, never before it)."""
    holders = run.agent.agent.holders
    assert isinstance(holders, LeaseHolders)
    renewing.pop().stop()
    stopped = time.monotonic()
    deadline: float | None = None
    while True:
        due = holders.next_expiry(time.monotonic())
        deadline = due if due is not None else deadline
        seen = await run.read()
        at = time.monotonic()
        if seen is not None and seen.failed_closed(API_0, "payments"):
            break
        if at - stopped > LEASE_S / 2 + SEEN_WITHIN_S:
            raise AssertionError(f"the expired holder is still steered to: {seen}")
        await asyncio.sleep(POLL_S)
    assert deadline is not None, "the agent never counted gw-b as the holder"
    assert at >= deadline, "failed closed before the holder gave the egress IP up"
    assert seen.peers == frozenset()
    run.record("a Lease expiring (from its deadline)", at - deadline)
    print(f"(renewals stopped {(deadline - stopped) * 1000:.0f} ms before that deadline)")
