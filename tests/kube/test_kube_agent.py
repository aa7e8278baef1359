"""The worker agent's Kubernetes side against the in-process API server, with the official client.

What the agent would notice: pods on its node being created, scheduled, relabelled and deleted
(and never a pod of another node), Nodes' labels and addresses, and which node holds each egress
IP, a takeover and a Lease that expires with no write at all. Each test prints how long each
change took to be seen (target: within 1 s); the assertions only bound it generously.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Generic, TypeVar

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from egressgw.identity import IPAddress
from egressgw.kube.agent_source import KubeAgentSource, node_pod
from egressgw.kube.holders import HolderRecord, LeaseHolders, holders_at, next_expiry, read_lease
from egressgw.kube.leases import LeaseOwnership, LeaseTiming, lease_name
from egressgw.kube.reflector import WatchSettings
from egressgw.policy.model import EgressGateway, LabelSelector, Node, Pod, Snapshot
from egressgw.testing.apiserver import FakeApiServer
from tests.kube.cluster import gateway, namespace

Obj = dict[str, Any]
T = TypeVar("T")
SEEN_WITHIN_S = 5.0  # generous bound for "seen"; the target, printed, is 1 s
LEASE_NS = "egressgw-system"
PAYMENTS_IP = ipaddress.ip_address("198.51.100.10")
WATCH = WatchSettings(watch_timeout_s=5, backoff_first_s=0.05)


def node(name: str, *addresses: str, gateway: bool = False) -> Obj:
    labels = {"egressgw.io/gateway": "true"} if gateway else {}
    typed = [{"type": "InternalIP", "address": a} for a in addresses]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {
            "addresses": [*typed, {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def pod(
    node_name: str | None,
    ns: str,
    name: str,
    address: str | None,
    labels: dict[str, str] | None = None,
) -> Obj:
    spec: Obj = {"containers": [{"name": "app", "image": "example"}]}
    if node_name is not None:
        spec["nodeName"] = node_name
    status: Obj = {"phase": "Pending"}
    if address is not None:
        status = {"phase": "Running", "podIP": address, "podIPs": [{"ip": address}]}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": "api"}},
        "spec": spec,
        "status": status,
    }


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer(bookmark_interval_s=0.2)
    server.start()
    for obj in (
        namespace("payments", "payments"),
        node("worker-a", "192.0.2.21"),
        node("worker-b", "192.0.2.22"),
        node("gw-a", "198.51.100.2", gateway=True),
        pod("worker-a", "payments", "api-0", "192.0.2.100"),
        pod("worker-b", "payments", "api-9", "192.0.2.109"),
        gateway("payments", "payments", str(PAYMENTS_IP)),
    ):
        server.put(obj)
    try:
        yield server
    finally:
        server.stop()


class Seen(Generic[T]):
    """What a background task reported, each value with the moment it arrived."""

    def __init__(self) -> None:
        self.items: list[tuple[float, T]] = []
        self._lock = threading.Lock()

    def add(self, value: T) -> None:
        with self._lock:
            self.items.append((time.monotonic(), value))

    def count(self) -> int:
        with self._lock:
            return len(self.items)

    @property
    def latest(self) -> T:
        with self._lock:
            return self.items[-1][1]

    def first(self, check: Callable[[T], bool], what: str, since: float | None = None) -> float:
        """Seconds from ``since`` (default: now) until a value arrived that ``check`` accepts,
        printed; AssertionError if none arrives within ``SEEN_WITHIN_S``."""
        started = time.monotonic() if since is None else since
        while time.monotonic() - started < SEEN_WITHIN_S:
            with self._lock:
                found = [at for at, value in self.items if at >= started and check(value)]
            if found:
                latency = found[0] - started
                print(f"seen {what} after {latency * 1000:.0f} ms")
                return latency
            time.sleep(0.01)
        raise AssertionError(f"not seen within {SEEN_WITHIN_S} s: {what}")


class LoopThread:
    """An event loop on its own thread, for coroutines that run until cancelled."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.tasks: list[asyncio.Task[None]] = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def spawn(self, make: Callable[[], Coroutine[Any, Any, None]]) -> None:
        def create() -> None:
            self.tasks.append(self.loop.create_task(make()))

        self.loop.call_soon_threadsafe(create)

    def close(self) -> None:
        async def finish() -> None:
            for task in self.tasks:
                task.cancel()
            for task in self.tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        asyncio.run_coroutine_threadsafe(finish(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    running = LoopThread()
    try:
        yield running
    finally:
        running.close()


def follow(loop: LoopThread, source: KubeAgentSource) -> Seen[Snapshot]:
    seen: Seen[Snapshot] = Seen()

    async def run() -> None:
        async for snapshot in source.snapshots():
            seen.add(snapshot)

    loop.spawn(run)
    return seen


def pods(snapshot: Snapshot) -> dict[str, Pod]:
    return {f"{p.namespace}/{p.name}": p for p in snapshot.pods}


def nodes(snapshot: Snapshot) -> dict[str, Node]:
    return {n.name: n for n in snapshot.nodes}


# -- the agent's source -------------------------------------------------------------------------


def test_the_agent_follows_the_pods_of_its_node_and_never_sees_another_nodes(
    api: FakeApiServer, kube: client.ApiClient, loop: LoopThread
) -> None:
    source = KubeAgentSource(kube, "worker-a", WATCH)
    assert source.not_ready_reason() == (
        "waiting for the first list of Namespace, Pod, EgressGateway, Node"
    )
    started = time.monotonic()
    seen = follow(loop, source)
    seen.first(lambda s: True, "the first snapshot (every kind listed)", started)
    first = seen.items[0][1]
    assert source.not_ready_reason() is None and source.synced.is_set()
    assert pods(first) == {
        "payments/api-0": Pod(
            "payments",
            "api-0",
            {"app": "api"},
            (ipaddress.ip_address("192.0.2.100"),),
            "worker-a",
        )
    }
    assert [g.name for g in first.gateways] == ["payments"] and first.policies == ()
    assert sorted(nodes(first)) == ["gw-a", "worker-a", "worker-b"]

    started = time.monotonic()
    api.put(pod("worker-b", "payments", "api-8", "192.0.2.108"))  # not ours: never seen
    api.put(pod("worker-a", "payments", "api-1", "192.0.2.101"))
    seen.first(lambda s: "payments/api-1" in pods(s), "a pod created on this node", started)

    started = time.monotonic()
    api.put(pod("worker-a", "payments", "api-0", "192.0.2.100", {"app": "web"}))
    seen.first(
        lambda s: pods(s)["payments/api-0"].labels == {"app": "web"},
        "a pod relabelled on this node",
        started,
    )

    started = time.monotonic()
    api.delete("Pod", "api-1", "payments")
    seen.first(lambda s: "payments/api-1" not in pods(s), "a pod deleted on this node", started)

    # as a pod is scheduled: created unbound, bound to this node, then running with an address
    api.put(pod(None, "payments", "api-2", None))
    api.put(pod("worker-a", "payments", "api-2", None))
    started = time.monotonic()
    api.put(pod("worker-a", "payments", "api-2", "192.0.2.102"))
    seen.first(lambda s: "payments/api-2" in pods(s), "a pod scheduled here and started", started)

    started = time.monotonic()
    api.put(node("worker-b", "192.0.2.32", gateway=True))
    relabelled = Node(
        "worker-b", {"egressgw.io/gateway": "true"}, (ipaddress.ip_address("192.0.2.32"),)
    )
    seen.first(
        lambda s: nodes(s)["worker-b"] == relabelled,
        "another Node relabelled and readdressed",
        started,
    )

    assert all(p.node_name == "worker-a" for _, snapshot in seen.items for p in snapshot.pods), (
        "a pod of another node reached the agent"
    )
    pod_watch = next(r for r in source.reflectors if r.kind == "Pod")
    # the server sent nothing about other nodes' pods: creating api-1, relabelling api-0,
    # deleting api-1, binding api-2 (ADDED) and starting it
    assert pod_watch.stats.events == 5


def test_a_pod_of_another_node_is_never_read_even_if_the_server_sent_it() -> None:
    assert node_pod(pod("worker-b", "payments", "api-9", "192.0.2.109"), "worker-a") is None
    assert node_pod(pod(None, "payments", "api-9", "192.0.2.109"), "worker-a") is None
    assert node_pod(pod("worker-a", "payments", "api-3", None), "worker-a") is None  # Pending
    readable = node_pod(pod("worker-a", "payments", "api-0", "192.0.2.100"), "worker-a")
    assert readable is not None and readable["spec"] == {"nodeName": "worker-a"}


def test_node_labels_and_addresses_arrive_and_heartbeats_change_nothing(
    api: FakeApiServer, kube: client.ApiClient
) -> None:
    source = KubeAgentSource(kube, "worker-a", WATCH)
    node_watch = next(r for r in source.reflectors if r.kind == "Node")

    def put_and_wait(obj: Obj) -> float:
        """Seconds until the Node watch has handed ``obj`` to the source."""
        started = time.monotonic()
        version = api.put(obj)["metadata"]["resourceVersion"]
        while int(node_watch.resource_version or 0) < int(version):  # bookmarks may pass it
            assert time.monotonic() - started < SEEN_WITHIN_S, "the Node watch is stuck"
            time.sleep(0.005)
        return time.monotonic() - started

    source.start()
    try:
        deadline = time.monotonic() + SEEN_WITHIN_S
        while source.pending_kinds():
            assert time.monotonic() < deadline, source.not_ready_reason()
            time.sleep(0.01)
        first = source.take()
        assert first is not None
        assert nodes(first)["worker-a"] == Node(
            "worker-a", {}, (ipaddress.ip_address("192.0.2.21"),)
        )

        heartbeat = node("worker-a", "192.0.2.21")
        heartbeat["status"]["conditions"][0]["lastHeartbeatTime"] = "2026-01-01T00:00:00Z"
        put_and_wait(heartbeat)
        assert source.take() is None  # nothing the agent reads changed

        latency = put_and_wait(node("gw-b", "198.51.100.3", "2001:db8:100::3", gateway=True))
        snapshot = source.take()
        assert snapshot is not None
        assert nodes(snapshot)["gw-b"] == Node(
            "gw-b",
            {"egressgw.io/gateway": "true"},
            (ipaddress.ip_address("198.51.100.3"), ipaddress.ip_address("2001:db8:100::3")),
        )
        print(f"a new gateway Node reached the source after {latency * 1000:.0f} ms")

        loopback = node("worker-b", "127.0.0.1")
        put_and_wait(loopback)
        snapshot = source.take()
        assert snapshot is not None and "worker-b" not in nodes(snapshot)
        assert [(p.kind, p.name, p.field) for p in source.problems()] == [
            ("Node", "worker-b", "status.addresses[0].address")
        ]
    finally:
        source.stop()


def test_the_fake_api_server_refuses_field_selectors_the_real_one_refuses(
    kube: client.ApiClient,
) -> None:
    core = client.CoreV1Api(kube)
    listed = core.list_pod_for_all_namespaces(field_selector="spec.nodeName!=worker-a")
    assert [(p.metadata or client.V1ObjectMeta()).name for p in listed.items] == ["api-9"]
    with pytest.raises(ApiException) as refused:
        core.list_namespace(field_selector="spec.nodeName=worker-a")
    assert refused.value.status == 400


# -- who holds each egress IP ---------------------------------------------------------------


def _record(holder: str, version: str, seen_at: float, duration_s: float = 10) -> HolderRecord:
    return HolderRecord(PAYMENTS_IP, holder, version, duration_s, seen_at)


def test_a_holder_counts_for_half_the_lease_duration_after_its_record_was_seen() -> None:
    records = {lease_name(PAYMENTS_IP): _record("gw-a", "7", seen_at=100.0)}
    assert holders_at(records, 100.0) == {PAYMENTS_IP: "gw-a"}
    assert holders_at(records, 104.999) == {PAYMENTS_IP: "gw-a"}
    assert next_expiry(records, 104.999) == 105.0
    assert holders_at(records, 105.0) == {} and next_expiry(records, 105.0) is None
    released = {lease_name(PAYMENTS_IP): _record("", "8", seen_at=100.0)}
    assert holders_at(released, 100.0) == {} and next_expiry(released, 100.0) is None


def test_only_egress_ip_leases_named_after_their_ip_are_read() -> None:
    def lease(name: str, annotation: str | None, holder: str | None) -> Obj:
        annotations = {} if annotation is None else {"egressgw.io/egress-ip": annotation}
        spec: Obj = {"leaseDurationSeconds": 4}
        if holder is not None:
            spec["holderIdentity"] = holder
        meta = {"name": name, "resourceVersion": "3", "annotations": annotations}
        return {"metadata": meta, "spec": spec}

    name = lease_name(PAYMENTS_IP)
    assert read_lease(lease(name, str(PAYMENTS_IP), "gw-a")) == (PAYMENTS_IP, "gw-a", "3", 4.0)
    assert read_lease(lease(name, str(PAYMENTS_IP), None)) == (PAYMENTS_IP, "", "3", 4.0)
    assert read_lease(lease("egressgw-copy", str(PAYMENTS_IP), "gw-a")) is None
    assert read_lease(lease(name, None, "gw-a")) is None
    assert read_lease(lease(name, "not-an-ip", "gw-a")) is None


def test_the_expiry_decision_reads_the_injected_clock(
    api: FakeApiServer, kube: client.ApiClient
) -> None:
    now = [1000.0]
    writer = LeaseOwnership(kube, LEASE_NS, "gw-a", lambda: {}, LeaseTiming(10))
    writer.update([_gateway()])
    holders = LeaseHolders(kube, LEASE_NS, clock=lambda: now[0], settings=WATCH)
    holders.start()
    try:
        deadline = time.monotonic() + SEEN_WITHIN_S
        while holders.not_ready_reason() is not None:
            assert time.monotonic() < deadline, "the Leases were never listed"
            time.sleep(0.01)
        assert holders.holders() == {PAYMENTS_IP: "gw-a"}
        assert holders.next_expiry(now[0]) == 1005.0
        now[0] = 1004.99
        assert holders.holders() == {PAYMENTS_IP: "gw-a"}
        now[0] = 1005.0
        assert holders.holders() == {}
    finally:
        holders.stop()


def _gateway() -> EgressGateway:
    return EgressGateway("payments", LabelSelector(), egress_ips=(PAYMENTS_IP,))


def follow_holders(loop: LoopThread, holders: LeaseHolders) -> Seen[dict[IPAddress, str]]:
    seen: Seen[dict[IPAddress, str]] = Seen()

    async def run() -> None:
        await holders.run(lambda: seen.add(holders.holders()))

    loop.spawn(run)
    return seen


def test_the_agent_follows_a_takeover_a_release_a_relabel_and_a_deletion(
    api: FakeApiServer, kube: client.ApiClient, loop: LoopThread
) -> None:
    timing = LeaseTiming(10)
    clock = [0.0]
    old = LeaseOwnership(kube, LEASE_NS, "gw-a", lambda: {}, timing, clock=lambda: clock[0])
    new = LeaseOwnership(kube, LEASE_NS, "gw-b", lambda: {}, timing, clock=lambda: clock[0])
    holders = LeaseHolders(kube, LEASE_NS, settings=WATCH)
    seen = follow_holders(loop, holders)
    seen.first(lambda h: h == {}, "the first list of no Leases", since=time.monotonic() - 0.001)

    started = time.monotonic()
    old.update([_gateway()])  # creates the Lease naming gw-a
    seen.first(lambda h: h == {PAYMENTS_IP: "gw-a"}, "a new holder", started)

    new.update([_gateway()])  # gw-b reads gw-a's record at 0; gw-a falls silent
    clock[0] = timing.take_over_after_s
    started = time.monotonic()
    new.tick()
    assert new.holders() == {PAYMENTS_IP: "gw-b"}
    seen.first(lambda h: h == {PAYMENTS_IP: "gw-b"}, "a takeover", started)

    lease = api.get("Lease", lease_name(PAYMENTS_IP), LEASE_NS)
    del lease["spec"]["holderIdentity"]
    started = time.monotonic()
    api.put(lease)
    seen.first(lambda h: h == {}, "a released Lease", started)

    lease["spec"]["holderIdentity"] = "gw-a"
    started = time.monotonic()
    api.put(lease)
    seen.first(lambda h: h == {PAYMENTS_IP: "gw-a"}, "a Lease taken again", started)

    del lease["metadata"]["labels"]["app.kubernetes.io/managed-by"]
    started = time.monotonic()
    api.put(lease)  # no longer egressgw's: its watch gets it as deleted
    seen.first(lambda h: h == {}, "a Lease that lost egressgw's label", started)
    lease["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "egressgw"
    started = time.monotonic()
    api.put(lease)
    seen.first(lambda h: h == {PAYMENTS_IP: "gw-a"}, "a Lease labelled again", started)

    calls = seen.count()
    started = time.monotonic()
    api.delete("Lease", lease_name(PAYMENTS_IP), LEASE_NS)
    seen.first(lambda h: h == {}, "a deleted Lease", started)
    assert seen.count() == calls + 1  # one call per change of holders()


def test_a_lease_that_is_not_renewed_expires_on_time_without_any_event(
    api: FakeApiServer, kube: client.ApiClient, loop: LoopThread
) -> None:
    timing = LeaseTiming(1)  # the holder counts for 0.5 s after each renewal is seen
    clock = [0.0]
    writer = LeaseOwnership(kube, LEASE_NS, "gw-a", lambda: {}, timing, clock=lambda: clock[0])
    holders = LeaseHolders(kube, LEASE_NS, settings=WATCH)
    seen = follow_holders(loop, holders)
    seen.first(lambda h: h == {}, "the first list of no Leases", since=time.monotonic() - 0.001)

    for round_ in range(2):
        started = time.monotonic()
        if round_ == 0:
            writer.update([_gateway()])  # created: then gw-a renews no more
        else:
            clock[0] += timing.renew_every_s
            writer.tick()  # one late renewal: a new record, which counts again
        seen.first(lambda h: h == {PAYMENTS_IP: "gw-a"}, "the holder", started)
        due = holders.next_expiry(time.monotonic())
        assert due is not None
        expired_after = seen.first(lambda h: h == {}, "the expiry", started)
        late = started + expired_after - due
        print(f"the expiry was noticed {late * 1000:.1f} ms after its deadline")
        assert late >= 0  # never before the holder has given the IP up
