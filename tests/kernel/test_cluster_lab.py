"""End to end: the lab as a cluster, with egressgw on every node.

Two workers run ``egressgw agent`` with pods of payments, analytics and sandbox each; two gateway
nodes run ``egressgw run --node-name`` and hold one project's egress IPs each, chosen by their Node
labels; pods resolve through the cluster DNS with a Kubernetes-style resolv.conf; a node router
masquerades ordinary node egress. The evidence is what the servers saw (PostgreSQL's log, the echo
servers' source addresses), the cluster DNS's query log, the node router's per-pod counters (a
selected pod counted there left without its gateway), counters in the external network, and what
each gateway node holds. One lab serves the module; the tests that disturb it (an agent killed, a
gateway node taken down) run last and put it back as they found it.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from egressgw.datapath.tunnel import DEVICE, PORT, VNI
from egressgw.lab import Lab, Verdict
from egressgw.lab.demo import NEVER_LEAVES
from egressgw.lab.lab import url
from egressgw.lab.services import cluster_available
from egressgw.lab.topology import (
    CLUSTER_DNS_V4,
    CLUSTER_DNS_V6,
    DB_V4,
    DB_V6,
    EGRESS_IPS,
    POSTGRES_PORT,
    ROUTER_V4,
    ROUTER_V6,
    TEST_PORT,
    WEB_V4,
    WEB_V6,
    gateway_of,
    node_by_name,
    pod_by_key,
    race_address,
    race_name,
)
from tests.conftest import require, require_kernel, unique_name

pytestmark = pytest.mark.kernel

PAYMENTS = ("payments/api-0", "payments/api-1")  # on worker-1 and worker-2
ANALYTICS = ("analytics/etl-0", "analytics/etl-1")
SANDBOX = ("sandbox/shell-0", "sandbox/shell-1")
SELECTED = PAYMENTS + ANALYTICS
FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["v4", "v6"])


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_kernel()
    missing = cluster_available()
    require(missing is None, missing or "")
    with Lab.up(unique_name("egc")) as built:
        yield built


def _egress(project: str, family: int) -> str:
    v4, v6 = EGRESS_IPS[project]
    return v4 if family == 4 else v6


def _db(family: int) -> str:
    return DB_V4 if family == 4 else DB_V6


def _web(family: int) -> str:
    return WEB_V4 if family == 4 else WEB_V6


def _router(family: int) -> str:
    return ROUTER_V4 if family == 4 else ROUTER_V6


def _dns(family: int) -> str:
    return CLUSTER_DNS_V4 if family == 4 else CLUSTER_DNS_V6


def _qtype(family: int) -> str:
    return "A" if family == 4 else "AAAA"


def _ip(family: int) -> str:
    return "ip" if family == 4 else "ip6"


def _routed(lab: Lab, pods: tuple[str, ...]) -> dict[str, int]:
    counts = lab.routed_packets()
    return {key: value for key, value in counts.items() if key.split()[0] in pods}


def _queries_from(log: str, address: str) -> list[str]:
    return [line for line in log.splitlines() if "query[" in line and line.endswith(f" {address}")]


# --- each project through its own gateway node ----------------------------------------------------


def test_each_gateway_node_holds_only_its_projects_egress_ips(lab: Lab) -> None:
    for project in EGRESS_IPS:
        gateway = gateway_of(project)
        assert sorted(lab.egress_ips(gateway.name)) == sorted(EGRESS_IPS[project]), gateway.name


@FAMILIES
def test_payments_pods_on_both_workers_leave_with_the_payments_egress_ip(
    lab: Lab, family: int
) -> None:
    egress = _egress("payments", family)
    routed = _routed(lab, PAYMENTS)
    for pod in PAYMENTS:
        outcome = lab.psql(pod, _db(family), "select inet_client_addr()")
        assert outcome.verdict is Verdict.CONNECTED and outcome.source == egress, (pod, outcome)
        assert lab.resolve(pod, "web.lab.example", family) == [_web(family)], pod
        outcome = lab.http(pod, url(_web(family), 80))
        assert outcome.verdict is Verdict.CONNECTED and outcome.source == egress, (pod, outcome)
    assert "connection authorized: user=postgres database=orders" in lab.pg_log()
    assert f"connection received: host={egress}" in lab.pg_log()
    assert _routed(lab, PAYMENTS) == routed, "a payments pod went out through the node router"


@FAMILIES
def test_analytics_leaves_through_the_other_gateway_node_with_its_own_ip(
    lab: Lab, family: int
) -> None:
    egress = _egress("analytics", family)
    routed = _routed(lab, ANALYTICS)
    for pod in ANALYTICS:
        outcome = lab.psql(pod, _db(family))
        assert outcome.verdict is Verdict.REFUSED_BY_SERVER, (pod, outcome)
        assert outcome.source == egress, (pod, outcome)
        # The web servers are payments' names only: closed to analytics, at its own gateway.
        outcome = lab.http(pod, url(_web(family), 80), timeout_s=3)
        assert outcome.verdict is Verdict.REJECTED_AT_GATEWAY, (pod, outcome)
    assert f'no pg_hba.conf entry for host "{egress}"' in lab.pg_log()
    assert _routed(lab, ANALYTICS) == routed


def test_nothing_leaves_with_a_pods_own_address(lab: Lab) -> None:
    assert set(lab.leaked_packets().values()) == {0}, lab.leaked_packets()


# --- DNS through the pods' own resolv.conf --------------------------------------------------------


def test_allowed_names_resolve_through_the_pods_resolv_conf_and_connect_at_once(lab: Lab) -> None:
    # getaddrinfo with the search list and ndots:5: three cluster.local names pass through to
    # the cluster DNS before each absolute name is answered by the gateway.
    for pod, first in zip(PAYMENTS, (0, 1000), strict=True):
        unresolved = race_address(first + 999)
        assert lab.http(pod, url(unresolved, TEST_PORT), timeout_s=3).verdict in NEVER_LEAVES
        report = lab.resolve_connect(
            pod,
            "r{}.race.lab.example",
            count=150,
            port=TEST_PORT,
            first=first,
            family=6,
            budget_s=60,
            expect_source=_egress("payments", 6),
        )
        assert report.failed == 0 and report.succeeded == 150, report.describe()
    for pod in PAYMENTS:
        assert lab.resolve(pod, "www.cdn.lab.example", 4) == ["203.0.113.21"]
        outcome = lab.http(pod, "http://www.cdn.lab.example/")
        assert outcome.verdict is Verdict.CONNECTED, (pod, outcome)
        assert outcome.source in EGRESS_IPS["payments"], (pod, outcome)


def test_denied_names_get_nxdomain_and_never_reach_the_cluster_dns(lab: Lab) -> None:
    exfiltration = f"x{uuid.uuid4().hex}.exfil.lab.example"
    for pod in (*PAYMENTS, "analytics/etl-0"):
        for family in (4, 6):
            for name in (exfiltration, "blocked.lab.example"):
                for tcp in (False, True):
                    answer = lab.dns_query(pod, name, _qtype(family), server=_dns(family), tcp=tcp)
                    assert answer.rcode == "NXDOMAIN", (pod, name, family, tcp, answer)
        # Through the resolver too: getent's "not found" is exit status 2.
        assert lab.exec(pod, ["getent", "hosts", "blocked.lab.example"]).returncode == 2
    log = lab.cluster_dns_log()
    assert exfiltration not in log
    assert exfiltration not in lab.dns_log()
    for qtype in ("A", "AAAA"):
        assert f"query[{qtype}] blocked.lab.example from" not in log
    # The search list's cluster.local names did pass through, from the gateway nodes.
    assert "query[A] blocked.lab.example.payments.svc.cluster.local from" in log


@FAMILIES
def test_cluster_local_names_still_resolve_and_pass_through_the_gateway(
    lab: Lab, family: int
) -> None:
    shell_1 = pod_by_key("sandbox/shell-1")
    for pod in ("payments/api-0", "analytics/etl-1"):
        spec = pod_by_key(pod)
        gateway = gateway_of(spec.project)
        assert lab.resolve(pod, "shell-1.shell.sandbox", family) == [shell_1.address(family)]
        answer = lab.dns_query(
            pod, "kube-dns.kube-system.svc.cluster.local", _qtype(family), server=_dns(family)
        )
        assert answer.rcode == "NOERROR" and answer.addresses == (_dns(family),), answer
        probe = f"probe-{uuid.uuid4().hex[:12]}.{spec.namespace}.svc.cluster.local"
        answer = lab.dns_query(pod, probe, _qtype(family), server=_dns(family))
        assert answer.rcode == "NXDOMAIN", answer
        lines = [line for line in lab.cluster_dns_log().splitlines() if f" {probe} " in line]
        assert lines, f"{probe} never reached the cluster DNS"
        sources = {line.rsplit(" ", 1)[-1] for line in lines if "query[" in line}
        assert sources <= {gateway.ipv4, gateway.ipv6}, (pod, lines)
    for pod in SELECTED:
        for address in (pod_by_key(pod).ipv4, pod_by_key(pod).ipv6):
            assert _queries_from(lab.cluster_dns_log(), address) == [], f"{pod} asked directly"


@FAMILIES
def test_dns_over_tcp_through_the_gateway(lab: Lab, family: int) -> None:
    shell_0 = pod_by_key("sandbox/shell-0")
    for pod in PAYMENTS:
        server = _dns(family)
        allowed = lab.dns_query(pod, "web.lab.example", _qtype(family), server=server, tcp=True)
        assert allowed.rcode == "NOERROR" and allowed.addresses == (_web(family),), allowed
        outcome = lab.http(pod, url(_web(family), 80))
        assert outcome.verdict is Verdict.CONNECTED, outcome
        assert outcome.source == _egress("payments", family)
        denied = lab.dns_query(pod, "blocked.lab.example", _qtype(family), server=server, tcp=True)
        assert denied.rcode == "NXDOMAIN", denied
        internal = lab.dns_query(pod, shell_0.dns_name, _qtype(family), server=server, tcp=True)
        assert internal.addresses == (shell_0.address(family),), internal
        index = 1900 + family + PAYMENTS.index(pod) * 10
        fresh = lab.dns_query(pod, race_name(index), "AAAA", server=server, tcp=True)
        assert fresh.addresses == (race_address(index),), fresh
        outcome = lab.http(pod, url(race_address(index), TEST_PORT))
        assert outcome.verdict is Verdict.CONNECTED, outcome


# --- what egressgw was not asked to govern --------------------------------------------------------


@FAMILIES
def test_unselected_pods_are_untouched_and_leave_as_the_node_router(lab: Lab, family: int) -> None:
    for pod in SANDBOX:
        own = pod_by_key(pod).address(family)
        routed = lab.routed_packets()[f"{pod} v{family}"]
        # No policy for them and no interception: the cluster DNS itself answers every name.
        answer = lab.dns_query(pod, "blocked.lab.example", _qtype(family), server=_dns(family))
        assert answer.rcode == "NOERROR" and answer.addresses, answer
        assert _queries_from(lab.cluster_dns_log(), own), f"{pod}'s query did not arrive as itself"
        outcome = lab.http(pod, url(answer.addresses[0], 80))
        assert outcome.verdict is Verdict.CONNECTED, (pod, outcome)
        assert outcome.source == _router(family), (pod, outcome)
        assert lab.routed_packets()[f"{pod} v{family}"] > routed


@FAMILIES
def test_pod_to_pod_traffic_keeps_its_source(lab: Lab, family: int) -> None:
    routed = lab.routed_packets()
    pairs = (
        ("payments/api-0", "sandbox/shell-1"),  # across the workers
        ("analytics/etl-1", "sandbox/shell-0"),
        ("payments/api-1", "sandbox/shell-1"),  # on one worker
        ("analytics/etl-0", "sandbox/shell-1"),
    )
    for client, server in pairs:
        target = pod_by_key(server)
        short = f"{target.name}.{target.service}.{target.namespace}"
        assert lab.resolve(client, short, family) == [target.address(family)], client
        source = pod_by_key(client).address(family)
        outcome = lab.http(client, lab.pod_url(server, family))
        assert outcome.verdict is Verdict.CONNECTED, (client, outcome)
        assert outcome.source == source, (client, outcome)
        assert f"source={source} " in lab.echo_log(server)
    assert lab.routed_packets() == routed, "pod-to-pod traffic never passes the node router"


# --- no borrowed identity -------------------------------------------------------------------------


@FAMILIES
def test_a_pod_that_borrows_another_nodes_pod_address_never_leaves_as_that_pod(
    lab: Lab, family: int
) -> None:
    thief, owner = pod_by_key("payments/api-0"), pod_by_key("payments/api-1")
    borrowed = owner.address(family)
    egress = _egress("payments", family)
    ip = _ip(family)
    # The owner's identity may reach the web server: an address taken from it would be let out.
    assert lab.resolve(owner.key, "web.lab.example", family) == [_web(family)]
    prefix = "32" if family == 4 else "128"
    add = ["ip", "addr", "add", f"{borrowed}/{prefix}", "dev", "eth0"]
    lab.exec(thief.key, [*add, "nodad"] if family == 6 else add, check=True)
    try:
        # Its node's normal path (the router) is closed for the borrowed address meanwhile, so
        # the server never answers the owner for a connection the owner never opened.
        with (
            lab.counting("router", f"{ip} saddr {borrowed}", then="drop") as normal_path,
            lab.counting(
                "ext", f"{ip} saddr {egress} tcp dport 80", f"{ip} saddr {borrowed}"
            ) as ext,
        ):
            http_before = lab.http_log()
            outcome = lab.http(thief.key, url(_web(family), 80), timeout_s=2, interface=borrowed)
            time.sleep(0.3)
            as_owner, untranslated = ext()
            via_router = normal_path()[0]
    finally:
        lab.exec(thief.key, ["ip", "addr", "del", f"{borrowed}/{prefix}", "dev", "eth0"])
    assert outcome.verdict is not Verdict.CONNECTED, outcome
    where = f"(sent from {thief.node}; {via_router} packets took its normal path, the router)"
    assert as_owner == 0, f"{as_owner} packets left as {owner.key} with {egress} {where}"
    assert untranslated == 0, f"{untranslated} packets left with {borrowed} {where}"
    assert f"source={egress} " not in lab.http_log()[len(http_before) :]


@FAMILIES
def test_a_lone_reset_from_a_selected_pod_never_leaves_untranslated(lab: Lab, family: int) -> None:
    """A pod answers a segment it never asked for with a RST, which conntrack calls invalid
    (here: the SYN-ACK to a connection another pod opened with this pod's address). Allowed or
    not, it must never leave with the pod's own address."""
    pod = pod_by_key("payments/api-1")
    assert lab.resolve(pod.key, "web.lab.example", family) == [_web(family)]
    leaked = lab.leaked_packets()[f"{pod.key} v{family}"]
    argv = [sys.executable, "-m", "egressgw.lab.forge", "--via", "direct", "--flags", "rst"]
    argv += ["--inner-src", pod.address(family), "--inner-dst", _web(family)]
    argv += ["--sport", str(random.randrange(40000, 60000)), "--dport", "80", "--count", "2"]
    proc = lab.exec(pod.key, argv, timeout=15)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    time.sleep(0.3)
    escaped = lab.leaked_packets()[f"{pod.key} v{family}"] - leaked
    assert escaped == 0, f"{escaped} RSTs left with {pod.key}'s own address"


def _tunnel_mac(lab: Lab, node: str) -> str:
    proc = lab.exec(node, ["ip", "-j", "link", "show", DEVICE])
    assert proc.returncode == 0, f"{node} has no tunnel device {DEVICE}: {proc.stderr}"
    return str(json.loads(proc.stdout)[0]["address"])


def _forge(lab: Lab, worker: str, inner_src: str, inner_dst: str, sport: int) -> None:
    """From ``worker``, a VXLAN packet to payments' gateway node carrying a TCP SYN."""
    sender, gateway = node_by_name(worker), gateway_of("payments")
    argv = [
        sys.executable,
        "-m",
        "egressgw.lab.forge",
        "--outer-src",
        sender.ipv4,
        "--outer-dst",
        gateway.ipv4,
        "--vni",
        str(VNI),
        "--port",
        str(PORT),
        "--src-mac",
        _tunnel_mac(lab, worker),
        "--dst-mac",
        _tunnel_mac(lab, gateway.name),
        "--inner-src",
        inner_src,
        "--inner-dst",
        inner_dst,
        "--sport",
        str(sport),
        "--dport",
        str(POSTGRES_PORT),
    ]
    proc = lab.exec(worker, argv, timeout=15)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _wait_for(read: Callable[[], list[int]], index: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    counts = read()
    while counts[index] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
        counts = read()
    return counts


@FAMILIES
def test_a_forged_tunnel_packet_carrying_another_nodes_pod_is_dropped_at_the_gateway(
    lab: Lab, family: int
) -> None:
    """A compromised worker-1 puts SYNs to the database into the tunnel: one as its own pod
    (the control: it must go out), one as a pod of worker-2 (it must not)."""
    own, foreign = pod_by_key("payments/api-0"), pod_by_key("payments/api-1")
    assert own.node == "worker-1" and foreign.node == "worker-2"
    own_port, foreign_port = random.sample(range(40000, 60000), 2)
    db = _db(family)
    with lab.counting(
        "ext",
        f"{_ip(family)} daddr {db} tcp dport {POSTGRES_PORT} tcp sport {own_port}",
        f"{_ip(family)} daddr {db} tcp dport {POSTGRES_PORT} tcp sport {foreign_port}",
    ) as count:
        _forge(lab, "worker-1", foreign.address(family), db, foreign_port)
        _forge(lab, "worker-1", own.address(family), db, own_port)
        counts = _wait_for(count, 0, 3.0)
        time.sleep(0.3)
        counts = count()
    assert counts[0] > 0, (
        "the control (a pod of the sending node) never left: the forged packets do not match"
        " the tunnel, so the test shows nothing"
    )
    assert counts[1] == 0, f"{counts[1]} packets of {foreign.key} left, sent from worker-1"


# --- disruptions: an agent restarted, a gateway node down (they run last) -------------------------


class _Prober:
    """New connections from one pod, one after the other, until stopped (at most ``limit``)."""

    def __init__(self, lab: Lab, pod: str, family: int, limit: int = 200) -> None:
        self.lab, self.pod, self.family, self.limit = lab, pod, family, limit
        self.outcomes: list[tuple[Verdict, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"probe-{pod}", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and len(self.outcomes) < self.limit:
            if time.monotonic() > deadline:
                break
            outcome = self.lab.psql(self.pod, _db(self.family), connect_timeout_s=3)
            self.outcomes.append((outcome.verdict, outcome.source))

    def __enter__(self) -> _Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_agent_kill_9_and_restart_keeps_established_connections_and_steering(lab: Lab) -> None:
    pod, worker = "payments/api-0", "worker-1"
    for family in (4, 6):
        assert lab.resolve(pod, "web.lab.example", family) == [_web(family)]
    routed = _routed(lab, (pod,))
    with (
        lab.psql_session(pod, DB_V4) as pg4,
        lab.psql_session(pod, DB_V6) as pg6,
        lab.http_keepalive(pod, 4) as web4,
        lab.http_keepalive(pod, 6) as web6,
        _Prober(lab, pod, 4) as prober,
    ):
        sessions = {"pg4": pg4.client_and_backend(), "pg6": pg6.client_and_backend()}
        ports = {"web4": web4.first()["local_port"], "web6": web6.first()["local_port"]}
        assert sessions["pg4"][0] == _egress("payments", 4)
        assert sessions["pg6"][0] == _egress("payments", 6)

        lab.stop_daemon(kill9=True, node=worker)
        assert not lab.daemon_alive(worker)
        # The kernel keeps steering with the agent gone: old flows, new flows, DNS.
        assert pg4.client_and_backend() == sessions["pg4"]
        assert web6.again()["local_port"] == ports["web6"]
        outcome = lab.psql(pod, DB_V6)
        assert outcome.verdict is Verdict.CONNECTED, outcome
        assert outcome.source == _egress("payments", 6)
        fresh = lab.dns_query(pod, race_name(1950), "AAAA", server=CLUSTER_DNS_V6)
        assert fresh.addresses == (race_address(1950),), fresh
        assert lab.http(pod, url(race_address(1950), TEST_PORT)).verdict is Verdict.CONNECTED
        assert lab.http(pod, url(WEB_V4, 8080)).verdict is Verdict.REJECTED_AT_GATEWAY

        ready_s = lab.start_daemon(node=worker)
        assert pg4.client_and_backend() == sessions["pg4"]
        assert pg6.client_and_backend() == sessions["pg6"]
        for session, name in ((web4, "web4"), (web6, "web6")):
            answer = session.again()
            assert answer["ok"] and answer["local_port"] == ports[name], answer
        time.sleep(0.5)
    failed = [o for o in prober.outcomes if o != (Verdict.CONNECTED, _egress("payments", 4))]
    assert len(prober.outcomes) >= 3 and not failed, (ready_s, prober.outcomes)
    assert _routed(lab, (pod,)) == routed
    assert lab.daemon_alive()


def _payments_fail_closed(lab: Lab, pod: str) -> list[str]:
    """What went wrong for one payments pod while its gateway node is down (empty: nothing)."""
    problems = []
    for family in (4, 6):
        outcome = lab.psql(pod, _db(family), connect_timeout_s=2)
        if outcome.verdict not in NEVER_LEAVES:
            problems.append(f"{pod} psql IPv{family}: {outcome}")
        outcome = lab.http(pod, url(_web(family), 80), timeout_s=2)
        if outcome.verdict not in NEVER_LEAVES:
            problems.append(f"{pod} http IPv{family}: {outcome}")
        answer = lab.dns_query(
            pod, "db.lab.example", _qtype(family), server=_dns(family), timeout_s=2
        )
        if answer.rcode in ("NOERROR", "NXDOMAIN"):
            problems.append(f"{pod} DNS IPv{family} answered: {answer.summary()}")
    return problems


def test_a_gateway_node_down_fails_its_project_closed_and_leaves_the_other_alone(
    lab: Lab,
) -> None:
    gateway = gateway_of("payments")
    for pod in PAYMENTS:  # so only the node being down can explain what follows
        for family in (4, 6):
            assert lab.resolve(pod, "web.lab.example", family) == [_web(family)]
    routed, leaked = lab.routed_packets(), lab.leaked_packets()
    pg_before, dns_before = len(lab.pg_log()), len(lab.cluster_dns_log())
    lab.take_node_down(gateway.name)
    try:
        assert lab.node_is_down(gateway.name) and not lab.daemon_alive(gateway.name)
        with ThreadPoolExecutor(max_workers=len(PAYMENTS)) as pool:
            problems = [
                p
                for found in pool.map(lambda pod: _payments_fail_closed(lab, pod), PAYMENTS)
                for p in found
            ]
        assert problems == []
        for pod in ANALYTICS:
            for family in (4, 6):
                outcome = lab.psql(pod, _db(family))
                assert outcome.verdict is Verdict.REFUSED_BY_SERVER, (pod, outcome)
                assert outcome.source == _egress("analytics", family), (pod, outcome)
                answer = lab.dns_query(pod, "db.lab.example", _qtype(family), server=_dns(family))
                assert answer.addresses == (_db(family),), (pod, answer)
        for family in (4, 6):
            outcome = lab.http("sandbox/shell-0", url(_web(family), 80))
            assert outcome.source == _router(family), outcome
        after = lab.routed_packets()
        for pod in PAYMENTS:
            for family in (4, 6):
                key = f"{pod} v{family}"
                assert after[key] == routed[key], f"{key} went out through the node router"
        assert lab.leaked_packets() == leaked
        for family in (4, 6):
            assert f"host={_router(family)}" not in lab.pg_log()[pg_before:]
        dns_log = lab.cluster_dns_log()[dns_before:]
        for pod in PAYMENTS:
            for address in (pod_by_key(pod).ipv4, pod_by_key(pod).ipv6):
                assert _queries_from(dns_log, address) == [], f"{pod} asked the cluster DNS"
    finally:
        lab.bring_node_up(gateway.name)
    deadline = time.monotonic() + 10
    outcome = lab.psql("payments/api-1", DB_V4)
    while outcome.verdict is not Verdict.CONNECTED and time.monotonic() < deadline:
        time.sleep(0.5)
        outcome = lab.psql("payments/api-1", DB_V4)
    assert outcome.verdict is Verdict.CONNECTED, outcome
    assert outcome.source == _egress("payments", 4)
    assert sorted(lab.egress_ips(gateway.name)) == sorted(EGRESS_IPS["payments"])
