"""Kubernetes mode without the kernel: the official client against the fake API server.

The watch, status and Lease code paths of the real client run here (list, watch streams,
410 Gone, bookmarks, merge patches on /status, Lease create/replace with conflicts).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from egressgw.identity import IdentityRegistry
from egressgw.kube.leases import LeaseOwnership, LeaseTiming, lease_name
from egressgw.kube.reflector import WatchSettings
from egressgw.kube.source import KubeSource, workload_pod
from egressgw.kube.status import StatusWriter
from egressgw.plan import build
from egressgw.policy.model import EgressGateway, LabelSelector, Snapshot
from egressgw.testing.apiserver import FakeApiServer
from tests.kube.cluster import condition, gateway, namespace, node, pod, policy


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer(bookmark_interval_s=0.2)
    server.start()
    for obj in (
        namespace("payments", "payments"),
        node("gw-a"),
        pod("payments", "api-0", "192.0.2.10"),
        gateway("payments", "payments", "198.51.100.10"),
    ):
        server.put(obj)
    try:
        yield server
    finally:
        server.stop()


class Follower:
    """Runs a KubeSource's snapshots() on its own loop thread and keeps the latest."""

    def __init__(self, source: KubeSource) -> None:
        self.source = source
        self.snapshots: list[Snapshot] = []
        self.loop = asyncio.new_event_loop()
        self.task: asyncio.Task[None] | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def follow() -> None:
            async for snapshot in source.snapshots():
                self.snapshots.append(snapshot)

        def spawn() -> None:
            self.task = self.loop.create_task(follow())

        self.loop.call_soon_threadsafe(spawn)

    @property
    def latest(self) -> Snapshot | None:
        return self.snapshots[-1] if self.snapshots else None

    def policies(self) -> list[str]:
        latest = self.latest
        return [] if latest is None else sorted(p.name for p in latest.policies)

    def close(self) -> None:
        self.source.stop()  # the watch threads end at their next wake-up

        async def finish() -> None:  # the task ends before its loop stops
            if self.task is not None:
                self.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.task

        asyncio.run_coroutine_threadsafe(finish(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


@pytest.fixture
def follower(kube: client.ApiClient) -> Iterator[Follower]:
    source = KubeSource(kube, "gw-a", WatchSettings(watch_timeout_s=5, backoff_first_s=0.05))
    following = Follower(source)
    try:
        yield following
    finally:
        following.close()


def test_only_running_pods_with_an_address_outside_the_host_network_are_workloads() -> None:
    running = pod("payments", "api-0", "192.0.2.10")
    assert workload_pod(running) == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "api-0", "namespace": "payments", "labels": {"app": "api"}},
        "status": {"podIPs": [{"ip": "192.0.2.10"}]},
    }
    assert workload_pod(pod("payments", "api-1", "192.0.2.11", phase="Pending")) is None
    no_ip = pod("payments", "api-2", "192.0.2.12")
    no_ip["status"]["podIPs"] = []
    assert workload_pod(no_ip) is None
    host = pod("payments", "api-3", "192.0.2.13")
    host["spec"]["hostNetwork"] = True
    assert workload_pod(host) is None


def test_nothing_is_yielded_until_every_kind_is_listed(kube: client.ApiClient) -> None:
    source = KubeSource(kube, "gw-a")
    assert source.not_ready_reason() == (
        "waiting for the first list of Namespace, Pod, EgressGateway, EgressPolicy, Node"
    )
    following = Follower(source)
    try:
        wait_until(lambda: following.latest is not None, "the first snapshot")
        assert source.not_ready_reason() is None
        first = following.snapshots[0]
        assert [p.name for p in first.pods] == ["api-0"]
        assert [g.name for g in first.gateways] == ["payments"]
        assert source.node_labels() == {"egressgw.io/gateway": "true"}
    finally:
        following.close()


def test_changes_arrive_across_broken_and_expired_watches(
    api: FakeApiServer, follower: Follower
) -> None:
    wait_until(lambda: follower.latest is not None, "the first snapshot")
    api.put(policy("payments", "database", [5432]))
    wait_until(lambda: follower.policies() == ["database"], "the new policy")

    api.break_watches()
    api.put(policy("payments", "web", [443]))
    wait_until(lambda: follower.policies() == ["database", "web"], "a change after a break")
    by_kind = {r.kind: r.stats for r in follower.source.reflectors}
    assert by_kind["EgressPolicy"].relists_after_gone == 0  # resumed, not relisted

    api.compact()
    api.delete("EgressPolicy", "database", "payments")  # missed: history is gone
    api.break_watches()
    wait_until(lambda: follower.policies() == ["web"], "the deletion, found by relisting")
    assert by_kind["EgressPolicy"].relists_after_gone >= 1


def test_bookmarks_keep_a_quiet_watch_current(api: FakeApiServer, follower: Follower) -> None:
    wait_until(lambda: follower.latest is not None, "the first snapshot")
    namespaces = next(r for r in follower.source.reflectors if r.kind == "Namespace")
    api.put(policy("payments", "database", [5432]))  # moves the global resourceVersion
    wait_until(lambda: namespaces.resource_version == str(api.store.rv), "a bookmark to catch up")
    assert namespaces.stats.bookmarks > 0 and namespaces.stats.events == 0


def test_an_outage_loses_nothing(api: FakeApiServer, follower: Follower) -> None:
    wait_until(lambda: follower.latest is not None, "the first snapshot")
    api.stop()
    api.put(policy("payments", "database", [5432]))
    assert follower.policies() == []
    api.start()
    wait_until(lambda: follower.policies() == ["database"], "the change made during the outage")


def test_status_says_accepted_or_invalid_and_is_written_only_when_it_changes(
    api: FakeApiServer, follower: Follower, kube: client.ApiClient
) -> None:
    api.put(policy("payments", "database", [5432]))
    api.put(policy("payments", "typo", [5432], cidr="203.0.113.10/24"))
    api.put(gateway("everyone", "payments", "198.51.100.20"))  # selects the same pods
    wait_until(lambda: follower.policies() == ["database"], "the valid policy")
    snapshot = follower.latest
    assert snapshot is not None
    holders = {ipaddress.ip_address("198.51.100.10"): "gw-a"}
    writer = StatusWriter(kube, follower.source, lambda: holders)
    writer.report(snapshot, build(snapshot, IdentityRegistry()), follower.source.problems())

    assert writer.write_once() == 4
    good = api.get("EgressPolicy", "database", "payments")
    assert good["status"]["observedGeneration"] == 1
    assert condition(good, "Accepted") == {
        "type": "Accepted",
        "status": "True",
        "reason": "Accepted",
        "message": "valid and applied",
        "observedGeneration": 1,
        "lastTransitionTime": condition(good, "Accepted")["lastTransitionTime"],  # type: ignore[index]
    }
    bad = condition(api.get("EgressPolicy", "typo", "payments"), "Accepted")
    assert bad is not None and (bad["status"], bad["reason"]) == ("False", "Invalid")
    assert bad["message"] == (
        "spec.egress[0].to[0].cidr: 203.0.113.10/24 has host bits set: write 203.0.113.0/24 for"
        " the whole network, or 203.0.113.10/32 for the single address"
    )
    gw = api.get("EgressGateway", "payments")
    assert gw["status"]["egressIPs"] == [{"ip": "198.51.100.10", "node": "gw-a"}]
    conflict = condition(gw, "Conflict")
    assert conflict is not None and conflict["status"] == "True"
    assert "selected by EgressGateways everyone, payments" in conflict["message"]
    assert api.get("EgressGateway", "everyone")["status"]["egressIPs"] == [{"ip": "198.51.100.20"}]
    assert api.get("EgressGateway", "payments")["metadata"]["generation"] == 1

    assert writer.write_once() == 0  # the watch may lag; what we wrote is not written again
    wait_until(
        lambda: (
            (follower.source.raw("EgressPolicy", "payments", "typo") or {}).get("status")
            is not None
        ),
        "the watch to show the status",
    )
    assert writer.write_once() == 0
    patches = api.count("PATCH", "/status")
    holders[ipaddress.ip_address("198.51.100.10")] = "gw-b"
    assert writer.write_once() == 1 and api.count("PATCH", "/status") == patches + 1
    gw = api.get("EgressGateway", "payments")
    assert gw["status"]["egressIPs"] == [{"ip": "198.51.100.10", "node": "gw-b"}]
    assert condition(gw, "Conflict")["lastTransitionTime"] == conflict["lastTransitionTime"]  # type: ignore[index]


def test_lease_writes_conflict_on_a_stale_resource_version(kube: client.ApiClient) -> None:
    leases = client.CoordinationV1Api(kube)
    body = client.V1Lease(
        metadata=client.V1ObjectMeta(name="egressgw-198-51-100-10"),
        spec=client.V1LeaseSpec(holder_identity="gw-a", lease_duration_seconds=10),
    )
    created = leases.create_namespaced_lease("egressgw-system", body)
    with pytest.raises(ApiException) as exists:
        leases.create_namespaced_lease("egressgw-system", body)
    assert exists.value.status == 409
    assert created.spec is not None
    created.spec.holder_identity = "gw-b"
    leases.replace_namespaced_lease("egressgw-198-51-100-10", "egressgw-system", created)
    created.spec.holder_identity = "gw-c"  # still the old resourceVersion
    with pytest.raises(ApiException) as stale:
        leases.replace_namespaced_lease("egressgw-198-51-100-10", "egressgw-system", created)
    assert stale.value.status == 409
    now = leases.read_namespaced_lease("egressgw-198-51-100-10", "egressgw-system")
    assert now.spec is not None and now.spec.holder_identity == "gw-b"


def _gateway(name: str, address: str, selector: LabelSelector | None = None) -> EgressGateway:
    return EgressGateway(
        name, LabelSelector(), egress_ips=(ipaddress.ip_address(address),), node_selector=selector
    )


def test_each_egress_ip_has_one_holder_and_ineligible_nodes_never_hold(
    kube: client.ApiClient,
) -> None:
    only_red = LabelSelector(match_labels=(("zone", "red"),))
    gateways = [_gateway("a", "198.51.100.10"), _gateway("b", "198.51.100.20", only_red)]
    red = LeaseOwnership(kube, "egressgw-system", "red", lambda: {"zone": "red"}, LeaseTiming(2))
    blue = LeaseOwnership(kube, "egressgw-system", "blue", lambda: {"zone": "blue"}, LeaseTiming(2))
    for _ in range(3):
        blue.update(gateways)  # blue first: it may take "a", never "b"
        red.update(gateways)
    held = {
        str(ip): [o.node_name for o in (red, blue) if o.holds(g, ip)]
        for g in gateways
        for ip in g.egress_ips
    }
    assert held["198.51.100.20"] == ["red"]
    assert len(held["198.51.100.10"]) == 1
    assert red.holders() == {ipaddress.ip_address(k): v[0] for k, v in held.items()}
    assert lease_name(ipaddress.ip_address("2001:db8::")) == (
        "egressgw-2001-0db8-0000-0000-0000-0000-0000-0000"
    )


def test_a_lease_that_cannot_be_renewed_is_given_up_before_it_expires(
    api: FakeApiServer, kube: client.ApiClient
) -> None:
    timing = LeaseTiming(10)
    owner = LeaseOwnership(kube, "egressgw-system", "gw-a", lambda: {}, timing)
    gateways = [_gateway("a", "198.51.100.10")]
    owner.update(gateways)
    assert owner.holds(gateways[0], ipaddress.ip_address("198.51.100.10"))
    api.stop()
    owner.tick()  # the renewal fails
    assert owner.stats.api_failures == 1
    assert owner.expire(time.monotonic() + timing.give_up_after_s + 0.1) == [
        ipaddress.ip_address("198.51.100.10")
    ]
    owner.update(gateways)
    assert not owner.holds(gateways[0], ipaddress.ip_address("198.51.100.10"))
    assert timing.give_up_after_s < timing.take_over_after_s < timing.duration_s


def test_a_silent_holder_is_taken_over_after_w_on_the_candidates_clock(
    api: FakeApiServer, kube: client.ApiClient
) -> None:
    timing = LeaseTiming(10)
    now = [0.0]

    def clock() -> float:
        return now[0]

    address = ipaddress.ip_address("198.51.100.10")
    gateways = [_gateway("a", str(address))]
    old = LeaseOwnership(kube, "egressgw-system", "gw-a", lambda: {}, timing, clock=clock)
    new = LeaseOwnership(kube, "egressgw-system", "gw-b", lambda: {}, timing, clock=clock)
    old.update(gateways)
    new.update(gateways)  # reads gw-a's record at 0
    assert old.holds(gateways[0], address) and not new.holds(gateways[0], address)

    now[0] = timing.give_up_after_s + 0.01  # gw-a is silent from here on
    assert old.expire(clock()) == [address]
    now[0] = timing.take_over_after_s - 0.01
    new.tick()
    assert new.holders() == {address: "gw-a"}
    now[0] = timing.take_over_after_s
    new.tick()
    new.update(gateways)
    assert new.holds(gateways[0], address) and new.holders() == {address: "gw-b"}
    lease = api.get("Lease", lease_name(address), "egressgw-system")
    assert (lease["spec"]["holderIdentity"], lease["spec"]["leaseTransitions"]) == ("gw-b", 1)

    old.tick()  # back: the Lease names gw-b, which gw-a has long given up
    old.update(gateways)
    assert not old.holds(gateways[0], address)
    assert (old.stats.given_up, old.stats.lost, new.stats.acquired) == (1, 0, 1)
