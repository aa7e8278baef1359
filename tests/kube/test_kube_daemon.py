"""`egressgw run --kubernetes` against the fake API server, datapath in real gateway namespaces.

What a user notices: a policy created, changed and deleted in the API opens and closes traffic
and shows in the object's status; broken and expired watches and an API outage lose nothing;
two gateway nodes share two egress IPs, one holder each, and a failed holder's IP moves to the
other node within the Lease duration, its traffic dropped (never masqueraded) in between.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from egressgw.testing.apiserver import FakeApiServer
from tests.conftest import require_kernel
from tests.kube.cluster import (
    ANALYTICS_IP,
    PAYMENTS_IP,
    GatewayDaemon,
    Network,
    build_network,
    condition,
    gateway,
    namespace,
    node,
    pod,
    policy,
    wait_for,
)

pytestmark = pytest.mark.kernel
LEASE_S = 4


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer(bookmark_interval_s=0.5)
    server.start()
    try:
        for obj in (
            namespace("payments", "payments"),
            namespace("analytics", "analytics"),
            node("gw-a"),
            node("gw-b"),
            pod("payments", "api-0", "192.0.2.10"),
            pod("payments", "api-1", "192.0.2.11", phase="Pending"),
            gateway("payments", "payments", PAYMENTS_IP),
        ):
            server.put(obj)
        yield server
    finally:
        server.stop()


@pytest.fixture
def one_node(api: FakeApiServer, tmp_path: Path) -> Iterator[tuple[Network, GatewayDaemon]]:
    require_kernel()
    net = build_network(["gw-a"])
    daemon = GatewayDaemon(net, "gw-a", api, tmp_path, LEASE_S)
    try:
        net.listen(5432)
        net.listen(443)
        daemon.start()
        daemon.wait_ready()
        yield net, daemon
    finally:
        daemon.kill()
        net.close()


def _accepted(api: FakeApiServer, name: str, generation: int) -> bool:
    found = condition(api.get("EgressPolicy", name, "payments"), "Accepted")
    status = api.get("EgressPolicy", name, "payments").get("status") or {}
    return (
        found is not None
        and found["status"] == "True"
        and status.get("observedGeneration") == generation
    )


def test_policy_lifecycle_reaches_the_datapath_and_the_status(
    api: FakeApiServer, one_node: tuple[Network, GatewayDaemon]
) -> None:
    net, _daemon = one_node
    wait_for(lambda: PAYMENTS_IP in net.egress_ips_on("gw-a"), "the egress IP to be held", 10)
    assert net.source_seen("gw-a", 5432, timeout=0.5) is None  # defaultAction Deny

    api.put(policy("payments", "database", [5432]))
    wait_for(lambda: net.source_seen("gw-a", 5432) == PAYMENTS_IP, "5432 to open", 5)
    wait_for(lambda: _accepted(api, "database", 1), "Accepted, generation 1", 5)
    gw = api.get("EgressGateway", "payments")
    wait_for(
        lambda: (
            api.get("EgressGateway", "payments")["status"].get("egressIPs")
            == [{"ip": PAYMENTS_IP, "node": "gw-a"}]
        ),
        "the gateway status to name the holder",
        5,
    )
    gw = api.get("EgressGateway", "payments")
    assert condition(gw, "Conflict") is not None and condition(gw, "Conflict")["status"] == "False"  # type: ignore[index]

    api.put(policy("payments", "database", [443]))
    wait_for(lambda: net.source_seen("gw-a", 443) == PAYMENTS_IP, "443 to open", 5)
    assert net.source_seen("gw-a", 5432, timeout=0.5) is None
    wait_for(lambda: _accepted(api, "database", 2), "Accepted, generation 2", 5)

    api.put(policy("payments", "typo", [5432], cidr="203.0.113.10/24"))
    wait_for(
        lambda: (
            (condition(api.get("EgressPolicy", "typo", "payments"), "Accepted") or {}).get("reason")
            == "Invalid"
        ),
        "the invalid policy to be reported",
        5,
    )
    invalid = condition(api.get("EgressPolicy", "typo", "payments"), "Accepted")
    assert invalid is not None and invalid["status"] == "False"
    assert invalid["message"].startswith("spec.egress[0].to[0].cidr: 203.0.113.10/24 has host bits")
    assert net.source_seen("gw-a", 443) == PAYMENTS_IP  # the valid policy stays in force
    assert net.source_seen("gw-a", 5432, timeout=0.5) is None

    writes = api.count("PATCH", "/status")
    time.sleep(1.5)  # a few Lease rounds and bookmarks: nothing changed, nothing is written
    assert api.count("PATCH", "/status") == writes

    api.delete("EgressPolicy", "database", "payments")
    wait_for(lambda: net.source_seen("gw-a", 443, timeout=0.5) is None, "443 to close", 5)


def test_broken_and_expired_watches_and_an_outage_lose_nothing(
    api: FakeApiServer, one_node: tuple[Network, GatewayDaemon]
) -> None:
    net, daemon = one_node
    assert daemon.proc is not None
    pid = daemon.proc.pid
    wait_for(lambda: PAYMENTS_IP in net.egress_ips_on("gw-a"), "the egress IP to be held", 10)

    api.break_watches()
    api.put(policy("payments", "database", [5432]))
    wait_for(lambda: net.source_seen("gw-a", 5432) == PAYMENTS_IP, "5432 after a broken watch", 5)

    api.compact()  # history gone: resuming from the old resourceVersion gets 410
    api.break_watches()
    api.put(policy("payments", "database", [5432, 443]))
    wait_for(lambda: net.source_seen("gw-a", 443) == PAYMENTS_IP, "443 after a relist", 5)
    assert "expired; relisting" in daemon.log()

    api.stop()  # the API server goes away
    assert net.source_seen("gw-a", 443) == PAYMENTS_IP  # last known state still enforced
    api.put(policy("payments", "database", [5432]))  # changed while we cannot see it
    # the Lease cannot be renewed: the address goes before the Lease could expire elsewhere
    wait_for(lambda: PAYMENTS_IP not in net.egress_ips_on("gw-a"), "the IP to be given up", LEASE_S)
    assert net.source_seen("gw-a", 5432, timeout=0.5) is None  # dropped, never masqueraded
    assert net.peers[-1] == PAYMENTS_IP

    api.start()
    wait_for(lambda: PAYMENTS_IP in net.egress_ips_on("gw-a"), "the IP to come back", 20)
    wait_for(lambda: net.source_seen("gw-a", 443, timeout=0.5) is None, "the missed change", 20)
    assert net.source_seen("gw-a", 5432) == PAYMENTS_IP
    assert daemon.proc.pid == pid and daemon.proc.poll() is None  # caught up without a restart


def test_two_nodes_share_two_egress_ips_and_take_over_within_the_lease_duration(
    api: FakeApiServer, tmp_path: Path
) -> None:
    require_kernel()
    api.put(gateway("analytics", "analytics", ANALYTICS_IP))
    api.put(policy("payments", "database", [5432]))
    net = build_network(["gw-a", "gw-b"])
    daemons = {n: GatewayDaemon(net, n, api, tmp_path, LEASE_S) for n in ("gw-a", "gw-b")}
    try:
        net.listen(5432)
        for daemon in daemons.values():
            daemon.start()
        for daemon in daemons.values():
            daemon.wait_ready()

        def holders() -> dict[str, list[str]]:
            return {
                ip: [n for n in daemons if ip in net.egress_ips_on(n)]
                for ip in (PAYMENTS_IP, ANALYTICS_IP)
            }

        wait_for(
            lambda: (
                all(len(h) == 1 for h in holders().values())
                and {h[0] for h in holders().values()} == {"gw-a", "gw-b"}
            ),
            "one holder per egress IP, one IP per node",
            15,
        )
        time.sleep(1.0)  # several renewals later: still exactly one holder each
        held = holders()
        assert all(len(h) == 1 for h in held.values()), held
        owner = held[PAYMENTS_IP][0]
        survivor = "gw-b" if owner == "gw-a" else "gw-a"
        wait_for(
            lambda: (
                api.get("EgressGateway", "payments").get("status", {}).get("egressIPs")
                == [{"ip": PAYMENTS_IP, "node": owner}]
            ),
            "the status to name the holder",
            5,
        )
        assert net.source_seen(owner, 5432) == PAYMENTS_IP
        assert net.source_seen(survivor, 5432, timeout=0.5) is None  # no IP of its gateway here

        # the holder's node fails: daemon killed, its uplink gone with it
        killed_at = time.monotonic()
        daemons[owner].kill()
        subprocess_ip_down(net, owner)
        assert net.source_seen(survivor, 5432, timeout=0.3) is None  # dropped, not masqueraded
        took = wait_for(
            lambda: PAYMENTS_IP in net.egress_ips_on(survivor), "the takeover", 2 * LEASE_S, 0.02
        )
        took = time.monotonic() - killed_at
        print(f"takeover after kill -9: {took:.2f} s (Lease duration {LEASE_S} s)")
        assert took < LEASE_S
        wait_for(
            lambda: net.source_seen(survivor, 5432) == PAYMENTS_IP, "traffic via the survivor", 5
        )
        assert ANALYTICS_IP in net.egress_ips_on(survivor)  # it keeps its own IP too
        wait_for(
            lambda: (
                api.get("EgressGateway", "payments")["status"].get("egressIPs")
                == [{"ip": PAYMENTS_IP, "node": survivor}]
            ),
            "the status to name the new holder",
            5,
        )
    finally:
        for daemon in daemons.values():
            daemon.kill()
        net.close()


def subprocess_ip_down(net: Network, node_name: str) -> None:
    subprocess.run(["ip", "-n", net.gateways[node_name], "link", "set", "up0", "down"], check=True)
