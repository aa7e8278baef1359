"""End to end: the lab with egressgw on every node and the repository's example policies.

Every workload talks to real servers; selected pods through their gateway node, the others through
the node router. What the servers saw (PostgreSQL's connection log, the echo server's source
address), the node router's per-pod counters and the external network's counters are the evidence.
One lab serves the module; the tests that disturb it (every egressgw killed and restarted, broken
manifests) put it back as they found it and run last. test_cluster_lab.py holds the tests about the
cluster itself (workers, gateway nodes, the tunnel, failover).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from egressgw.lab import Lab, Verdict
from egressgw.lab.demo import (
    EXPECTED,
    NEVER_LEAVES,
    format_failures,
    format_table,
    run_checks,
)
from egressgw.lab.services import cluster_available
from egressgw.lab.topology import (
    DB_V4,
    DB_V6,
    EGRESS_IPS,
    NODES,
    ROUTER_V4,
    ROUTER_V6,
    gateway_of,
)
from tests.conftest import require, require_kernel, unique_name

pytestmark = pytest.mark.kernel

PAYMENTS = ("payments/api-0", "payments/api-1")
ANALYTICS = "analytics/etl-1"
SANDBOX = ("sandbox/shell-0", "sandbox/shell-1")
FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["v4", "v6"])


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_kernel()
    missing = cluster_available()
    require(missing is None, missing or "")
    with Lab.up(unique_name("egt")) as built:
        yield built


def _db(family: int) -> str:
    return DB_V4 if family == 4 else DB_V6


def _egress_ip(project: str, family: int) -> str:
    return EGRESS_IPS[project][0 if family == 4 else 1]


def test_every_row_of_the_demo_table_holds(lab: Lab) -> None:
    results = run_checks(lab)
    assert [r.expectation for r in results] == list(EXPECTED)
    assert all(r.ok for r in results), (
        "\n" + format_table(results) + "\n" + format_failures(results)
    )


@FAMILIES
def test_payments_queries_postgres_from_both_workers_and_the_server_logs_its_egress_ip(
    lab: Lab, family: int
) -> None:
    egress_ip = _egress_ip("payments", family)
    for pod in PAYMENTS:
        outcome = lab.psql(pod, _db(family), "select count(*) from orders")
        assert outcome.verdict is Verdict.CONNECTED, outcome
        assert outcome.output == "2"  # the query ran: two rows in the lab's orders table
        outcome = lab.psql(pod, _db(family))
        assert outcome.source == egress_ip, (pod, outcome)
    assert f"connection received: host={egress_ip}" in lab.pg_log()
    assert "connection authorized: user=postgres database=orders" in lab.pg_log()


@FAMILIES
def test_analytics_reaches_postgres_and_pg_hba_refuses_it(lab: Lab, family: int) -> None:
    egress_ip = _egress_ip("analytics", family)
    outcome = lab.psql(ANALYTICS, _db(family))
    assert outcome.verdict is Verdict.REFUSED_BY_SERVER, outcome
    assert outcome.source == egress_ip
    assert f'no pg_hba.conf entry for host "{egress_ip}"' in lab.pg_log()


@FAMILIES
@pytest.mark.parametrize(
    ("pod", "port"),
    [("payments/api-1", 8080), ("analytics/etl-0", 80)],
    ids=["port-outside-policy", "no-policy"],
)
def test_destination_outside_policy_is_rejected_fast_at_the_gateway(
    lab: Lab, family: int, pod: str, port: int
) -> None:
    before = lab.http_log()
    outcome = lab.http(pod, lab.web_url(family, port))
    assert outcome.verdict is Verdict.REJECTED_AT_GATEWAY, outcome
    if family == 4:
        assert "No route to host" in outcome.detail and outcome.elapsed_s < 1.0
    else:
        # EACCES, after one SYN retransmission in the lab (see test_lab_topology).
        assert "Permission denied" in outcome.detail and outcome.elapsed_s < 2.5
    assert lab.http_log() == before, "the server must never see the rejected connection"


@FAMILIES
def test_the_unselected_pods_keep_their_normal_path_through_the_node_router(
    lab: Lab, family: int
) -> None:
    router = ROUTER_V4 if family == 4 else ROUTER_V6
    for pod in SANDBOX:
        counter = f"{pod} v{family}"
        routed, leaked = lab.routed_packets()[counter], lab.leaked_packets()[counter]
        outcome = lab.http(pod, lab.web_url(family, 80))
        assert outcome.verdict is Verdict.CONNECTED and outcome.source == router, (pod, outcome)
        outcome = lab.psql(pod, _db(family))
        assert outcome.verdict is Verdict.REFUSED_BY_SERVER and outcome.source == router, outcome
        assert lab.routed_packets()[counter] > routed
        assert lab.leaked_packets()[counter] == leaked


def test_established_flows_survive_kill_9_of_every_egressgw_and_restart(lab: Lab) -> None:
    pod = PAYMENTS[1]
    # The policy allows the web server by name only: resolve it first, as a client would.
    for family in (4, 6):
        assert lab.resolve(pod, "web.lab.example", family), f"no IPv{family} answer"
    routed = lab.routed_packets()
    with (
        lab.psql_session(pod, DB_V4) as pg4,
        lab.psql_session(pod, DB_V6) as pg6,
        lab.http_keepalive(pod, 4) as web4,
        lab.http_keepalive(pod, 6) as web6,
    ):
        sessions = {"pg4": pg4.client_and_backend(), "pg6": pg6.client_and_backend()}
        ports = {"web4": web4.first()["local_port"], "web6": web6.first()["local_port"]}
        assert sessions["pg4"][0] == _egress_ip("payments", 4)
        assert sessions["pg6"][0] == _egress_ip("payments", 6)

        lab.stop_daemon(kill9=True)
        for node in NODES:
            assert not lab.daemon_alive(node.name), node.name
        # The kernel keeps enforcing with every egressgw gone: old flows, new flows, rejections.
        assert pg4.client_and_backend() == sessions["pg4"]
        assert web6.again()["local_port"] == ports["web6"]
        assert lab.psql(pod, DB_V4).verdict is Verdict.CONNECTED
        # A destination learned from DNS before the crash keeps opening new flows.
        assert lab.http(pod, lab.web_url(6, 80)).verdict is Verdict.CONNECTED
        assert lab.http(pod, lab.web_url(4, 8080)).verdict is Verdict.REJECTED_AT_GATEWAY
        assert lab.http("analytics/etl-0", lab.web_url(4, 80)).verdict in NEVER_LEAVES

        lab.start_daemon()
        assert pg4.client_and_backend() == sessions["pg4"]
        assert pg6.client_and_backend() == sessions["pg6"]
        for session, name in ((web4, "web4"), (web6, "web6")):
            answer = session.again()
            assert answer["ok"] and answer["local_port"] == ports[name], answer
    for project in EGRESS_IPS:
        assert "adopted table" in lab.daemon_log(node=gateway_of(project).name)
    assert lab.routed_packets() == routed
    results = run_checks(lab)
    assert all(r.ok for r in results), "\n" + format_failures(results)


BROKEN_YAML = "apiVersion: egressgw.io/v1alpha1\nkind: EgressPolicy\nmetadata: {name: [\n"
# Would open web:80 to analytics if it were accepted; the port number makes it invalid.
INVALID_POLICY = """\
apiVersion: egressgw.io/v1alpha1
kind: EgressPolicy
metadata: {name: web, namespace: analytics}
spec:
  egress:
    - to: [{cidr: 203.0.113.0/24}, {cidr: "2001:db8:203::/64"}]
      ports: [{protocol: TCP, port: 80}, {protocol: TCP, port: 70000}]
"""


def test_broken_manifests_leave_the_previous_state_enforcing(lab: Lab) -> None:
    payments = lab.manifests_dir / "payments.yaml"
    original = payments.read_text()
    gateways = [gateway_of(project).name for project in EGRESS_IPS]
    offsets = {node: lab.daemon_log_offset(node=node) for node in gateways}
    try:
        lab.write_manifest("payments.yaml", BROKEN_YAML)
        lab.write_manifest("zz-analytics-web.yaml", INVALID_POLICY)
        for node in gateways:
            for name in ("payments.yaml", "zz-analytics-web.yaml"):
                line = lab.wait_for_daemon_log(name, since=offsets[node], node=node)
                assert "invalid manifest" in line, line
        results = run_checks(lab)
        assert all(r.ok for r in results), "\n" + format_failures(results)
    finally:
        offsets = {node: lab.daemon_log_offset(node=node) for node in gateways}
        (lab.manifests_dir / "zz-analytics-web.yaml").unlink(missing_ok=True)
        lab.write_manifest("payments.yaml", original)
        for node in gateways:
            lab.wait_for_daemon_log(
                "manifest loaded: " + str(payments), since=offsets[node], node=node
            )
    assert lab.psql(PAYMENTS[0], DB_V4).verdict is Verdict.CONNECTED
