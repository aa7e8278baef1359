"""The lab without egressgw: its cluster network, its servers, its counters, and its removal.

One lab serves the module (about a second to build). Without egressgw every pod leaves through the
node router, as on a cluster before egressgw is installed. A hand-written stand-in (policy routes
on the workers toward the gateway nodes, an nftables ruleset and the egress IPs on each gateway)
plays egressgw where a test needs it, so the lab and the demo's tables are checked on their own;
the end-to-end tests with the real egressgw are in test_lab_e2e.py and test_cluster_lab.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from egressgw.lab import Lab, LabError, Verdict, down, services
from egressgw.lab import lab as lab_module
from egressgw.lab.demo import EXPECTED, FAILOVER, RECOVERED, format_table, run_checks
from egressgw.lab.lab import url
from egressgw.lab.manifests import CLUSTER_FILE
from egressgw.lab.netns import NETNS_ETC_DIR, pid_alive
from egressgw.lab.topology import (
    CDN_V4,
    CDN_V6,
    CLUSTER_DNS_TTL_SECONDS,
    CLUSTER_DNS_V4,
    CLUSTER_DNS_V6,
    CLUSTER_SUPERNET_V6,
    DB_V4,
    DB_V6,
    DNS_BLACKHOLE_V4,
    DNS_BLACKHOLE_V6,
    DNS_DEAD_V4,
    DNS_DEAD_V6,
    DNS_V4,
    DNS_V6,
    EGRESS_IPS,
    GATEWAYS,
    KUBERNETES_SERVICE_V4,
    MANY_ADDRESS_COUNT,
    MANY_NAME,
    NODES,
    ORIGIN_V4,
    ORIGIN_V6,
    PODS,
    RACE_NAME_COUNT,
    ROUTER_V4,
    ROUTER_V6,
    SHORT_NAME,
    SHORT_TTL_SECONDS,
    SHORT_V4,
    TEST_PORT,
    WEB_ADDRESSES,
    WEB_V4,
    WEB_V6,
    WORKERS,
    NetnsNames,
    gateway_of,
    many_addresses,
    pod_by_key,
    race_address,
    race_name,
    worker_of,
)
from tests.conftest import require_kernel, unique_name

pytestmark = pytest.mark.kernel

PAYMENTS = "payments/api-0"
SERVER_PROCESSES = 6  # postgres, httpd, dnsmasq, the cluster DNS, two pods' echo servers


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_kernel()
    with Lab.up(unique_name("egt"), start_daemon=False) as built:
        yield built
    assert not any(Path("/run/netns", ns).exists() for ns in built.names.all())


def _ping(lab: Lab, where: str, address: str) -> bool:
    argv = ["ping", "-c", "1", "-W", "2", address]
    if ":" in address:
        argv.insert(1, "-6")
    return lab.exec(where, argv, timeout=5).returncode == 0


def _records(lab: Lab, where: str, name: str, qtype: str, server: str, tcp: bool = False) -> str:
    result = lab.dns_query(where, name, qtype, server=server, tcp=tcp)
    records = " ".join(f"{t}={d}" for _n, t, _ttl, d in result.answers)
    return f"{result.rcode} {records}".strip()


# --- the cluster network -------------------------------------------------------------------------


@pytest.mark.parametrize("pod", [pod.key for pod in PODS])
def test_every_pod_reaches_its_node_the_cluster_dns_and_a_pod_on_the_other_worker(
    lab: Lab, pod: str
) -> None:
    spec = pod_by_key(pod)
    worker = worker_of(spec)
    other = next(p for p in PODS if p.node != spec.node)
    for address in (
        worker.bridge_v4,
        worker.bridge_v6,
        CLUSTER_DNS_V4,
        CLUSTER_DNS_V6,
        other.ipv4,
        other.ipv6,
    ):
        assert _ping(lab, pod, address), f"{pod} cannot reach {address}"


def test_every_node_reaches_the_others_on_the_node_network(lab: Lab) -> None:
    for node in NODES:
        for other in NODES:
            if other is not node:
                for address in (other.ipv4, other.ipv6):
                    assert _ping(lab, node.name, address), f"{node.name} -> {address}"
    for gateway in GATEWAYS:
        for address in (DB_V4, DB_V6):
            assert _ping(lab, gateway.name, address), f"{gateway.name} -> {address}"


def test_pods_use_a_kubernetes_style_resolv_conf(lab: Lab) -> None:
    text = lab.exec("analytics/etl-1", ["cat", "/etc/resolv.conf"], check=True).stdout
    assert text.splitlines() == [
        "search analytics.svc.cluster.local svc.cluster.local cluster.local",
        f"nameserver {CLUSTER_DNS_V4}",
        f"nameserver {CLUSTER_DNS_V6}",
        "options ndots:5 timeout:1 attempts:1",
    ]
    node = lab.exec("worker-1", ["cat", "/etc/resolv.conf"], check=True).stdout
    assert f"nameserver {DNS_V4}" in node


def test_a_short_name_resolves_through_the_search_list_at_the_cluster_dns(lab: Lab) -> None:
    shell_1 = pod_by_key("sandbox/shell-1")
    proc = lab.exec(PAYMENTS, ["getent", "ahostsv4", "shell-1.shell.sandbox"], check=True)
    assert proc.stdout.split()[0] == shell_1.ipv4
    assert lab.resolve(PAYMENTS, "kubernetes.default", 4) == [KUBERNETES_SERVICE_V4]
    # ndots:5: the search list is tried first, then the name as given (forwarded outside).
    assert lab.resolve(PAYMENTS, "db.lab.example", 4) == [DB_V4]
    log = lab.cluster_dns_log()
    api_0 = pod_by_key(PAYMENTS).ipv4
    for name in (
        "shell-1.shell.sandbox.payments.svc.cluster.local",
        "shell-1.shell.sandbox.svc.cluster.local",
        "db.lab.example.payments.svc.cluster.local",
        "db.lab.example.cluster.local",
        "db.lab.example",
    ):
        assert f"query[A] {name} from {api_0}" in log, name


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("server", [CLUSTER_DNS_V4, CLUSTER_DNS_V6], ids=["v4", "v6"])
def test_the_cluster_dns_answers_cluster_local_and_forwards_the_rest(
    lab: Lab, server: str, tcp: bool
) -> None:
    shell_0, shell_1 = pod_by_key("sandbox/shell-0"), pod_by_key("sandbox/shell-1")

    def ask(name: str, qtype: str = "A") -> str:
        return _records(lab, "analytics/etl-0", name, qtype, server, tcp)

    assert ask("kube-dns.kube-system.svc.cluster.local") == f"NOERROR A={CLUSTER_DNS_V4}"
    assert ask("kube-dns.kube-system.svc.cluster.local", "AAAA") == f"NOERROR AAAA={CLUSTER_DNS_V6}"
    headless = lab.dns_query("analytics/etl-0", "shell.sandbox.svc.cluster.local", server=server)
    assert sorted(headless.addresses) == sorted((shell_0.ipv4, shell_1.ipv4)), headless
    assert ask(shell_1.dns_name, "AAAA") == f"NOERROR AAAA={shell_1.ipv6}"
    unknown = f"nothing-{'tcp' if tcp else 'udp'}-{server}.svc.cluster.local"
    assert ask(unknown) == "NXDOMAIN"
    assert unknown not in lab.dns_log(), "cluster.local is never forwarded"
    assert ask("db.lab.example", "AAAA") == f"NOERROR AAAA={DB_V6}"
    assert ask("nothing.lab.example") == "NXDOMAIN"
    short = lab.dns_query("analytics/etl-0", SHORT_NAME, "A", server=server, tcp=tcp)
    assert short.addresses == (SHORT_V4,) and short.ttls("A") == [SHORT_TTL_SECONDS]
    cluster = lab.dns_query("analytics/etl-0", shell_0.dns_name, "A", server=server, tcp=tcp)
    assert cluster.ttls("A") == [CLUSTER_DNS_TTL_SECONDS]


def test_a_big_answer_passes_the_cluster_dns_over_tcp(lab: Lab) -> None:
    many = lab.dns_query("sandbox/shell-1", MANY_NAME, "AAAA", server=CLUSTER_DNS_V6, tcp=True)
    assert sorted(many.addresses) == sorted(many_addresses())
    assert len(many.addresses) == MANY_ADDRESS_COUNT


@pytest.mark.parametrize("server", [DNS_V4, DNS_V6])
def test_the_external_dns_server_answers_the_lab_records(lab: Lab, server: str) -> None:
    def ask(name: str, qtype: str = "A") -> str:
        return _records(lab, "gateway-1", name, qtype, server)

    assert ask("db.lab.example") == "NOERROR A=203.0.113.10"
    assert ask("db.lab.example", "AAAA") == "NOERROR AAAA=2001:db8:203::10"
    assert ask("www.cdn.lab.example") == f"NOERROR A={CDN_V4}"
    assert ask("www.cdn.lab.example", "AAAA") == f"NOERROR AAAA={CDN_V6}"
    assert ask("blocked.lab.example") == "NOERROR A=203.0.113.30"
    assert ask("alias.lab.example") == f"NOERROR CNAME=origin.lab.example A={ORIGIN_V4}"
    assert ask("alias.lab.example", "AAAA") == f"NOERROR CNAME=origin.lab.example AAAA={ORIGIN_V6}"
    assert ask("nothing.lab.example") == "NXDOMAIN"
    last = RACE_NAME_COUNT - 1
    assert ask(race_name(last), "AAAA") == f"NOERROR AAAA={race_address(last)}"
    many = lab.dns_query("gateway-1", MANY_NAME, "AAAA", server=server, tcp=True)
    assert len(many.addresses) == MANY_ADDRESS_COUNT
    assert "query[A] alias.lab.example" in lab.dns_log()


@pytest.mark.parametrize(
    ("dead", "blackhole"), [(DNS_DEAD_V4, DNS_BLACKHOLE_V4), (DNS_DEAD_V6, DNS_BLACKHOLE_V6)]
)
def test_dead_and_blackhole_dns_servers_fail_as_designed(
    lab: Lab, dead: str, blackhole: str
) -> None:
    """The failover tests' upstreams: one refuses at once (ICMP), one never answers."""
    refused = lab.dns_query("gateway-1", "db.lab.example", server=dead, timeout_s=2)
    assert refused.rcode == "ERROR" and "refused" in refused.error.lower(), refused
    assert refused.elapsed_ms < 500
    silent = lab.dns_query("gateway-1", "db.lab.example", server=blackhole, timeout_s=1)
    assert silent.rcode == "TIMEOUT", silent


# --- the external network ------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("port", [80, 8080])
def test_echo_server_reports_each_gateway_nodes_own_address(
    lab: Lab, family: int, port: int
) -> None:
    for gateway in GATEWAYS:
        outcome = lab.http(gateway.name, lab.web_url(family, port))
        assert outcome.verdict is Verdict.CONNECTED, outcome
        assert outcome.source == (gateway.uplink_v4 if family == 4 else gateway.uplink_v6)
        assert f"source={outcome.source}" in lab.http_log()


def test_every_address_of_the_anyip_prefix_and_the_web_addresses_accept(lab: Lab) -> None:
    own_v4, own_v6 = GATEWAYS[0].uplink_v4, GATEWAYS[0].uplink_v6
    for address in (race_address(0), race_address(RACE_NAME_COUNT - 1), many_addresses()[-1]):
        outcome = lab.http("gateway-1", url(address, TEST_PORT))
        assert outcome.verdict is Verdict.CONNECTED, (address, outcome)
        assert outcome.source == own_v6
    outcome = lab.http("gateway-1", url(SHORT_V4, TEST_PORT))
    assert outcome.verdict is Verdict.CONNECTED and outcome.source == own_v4, outcome
    for address in WEB_ADDRESSES:
        outcome = lab.http("gateway-1", url(address, 80))
        assert outcome.verdict is Verdict.CONNECTED, (address, outcome)


@pytest.mark.parametrize("family", [4, 6])
def test_postgres_refuses_a_source_missing_from_pg_hba(lab: Lab, family: int) -> None:
    gateway = GATEWAYS[1]
    source = gateway.uplink_v4 if family == 4 else gateway.uplink_v6
    outcome = lab.psql(gateway.name, DB_V4 if family == 4 else DB_V6)
    assert outcome.verdict is Verdict.REFUSED_BY_SERVER, outcome
    assert outcome.source == source
    assert f'no pg_hba.conf entry for host "{source}"' in lab.pg_log()
    assert f"connection received: host={source}" in lab.pg_log()


# --- the node router and the counters ------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_without_egressgw_every_pod_leaves_through_the_node_router(lab: Lab, family: int) -> None:
    router = ROUTER_V4 if family == 4 else ROUTER_V6
    for pod in PODS:
        counter = f"{pod.key} v{family}"
        routed, leaked = lab.routed_packets()[counter], lab.leaked_packets()[counter]
        outcome = lab.http(pod.key, lab.web_url(family, 80))
        assert outcome.verdict is Verdict.CONNECTED and outcome.source == router, (pod, outcome)
        assert lab.routed_packets()[counter] > routed
        assert lab.leaked_packets()[counter] == leaked
    refused = lab.psql(PAYMENTS, DB_V4 if family == 4 else DB_V6)
    assert refused.verdict is Verdict.REFUSED_BY_SERVER and refused.source == router, refused


@pytest.mark.parametrize("family", [4, 6])
def test_pod_to_pod_across_the_workers_keeps_its_source(lab: Lab, family: int) -> None:
    routed = lab.routed_packets()
    for client, server in (
        ("payments/api-0", "sandbox/shell-1"),
        ("analytics/etl-1", "sandbox/shell-0"),
        ("payments/api-1", "sandbox/shell-1"),  # the same worker: across its bridge
    ):
        source = pod_by_key(client).address(family)
        outcome = lab.http(client, lab.pod_url(server, family))
        assert outcome.verdict is Verdict.CONNECTED and outcome.source == source, outcome
        assert f"source={source}" in lab.echo_log(server)
    assert lab.routed_packets() == routed, "pod-to-pod traffic never passes the router"


def test_traffic_that_escapes_without_translation_gets_no_reply_and_is_counted(lab: Lab) -> None:
    # A gateway node sends with a pod's address, untranslated: the external network has no route
    # back, so the client times out, and the leak counters see the pod's own address.
    shell_0 = pod_by_key("sandbox/shell-0")
    lab.exec("gateway-1", ["ip", "addr", "add", f"{shell_0.ipv4}/32", "dev", "lo"], check=True)
    try:
        before = lab.leaked_packets()
        outcome = lab.http("gateway-1", lab.web_url(4, 80), timeout_s=1, interface=shell_0.ipv4)
        assert outcome.verdict is Verdict.TIMEOUT, outcome
        after = lab.leaked_packets()
    finally:
        lab.exec("gateway-1", ["ip", "addr", "del", f"{shell_0.ipv4}/32", "dev", "lo"])
    assert after["sandbox/shell-0 v4"] > before["sandbox/shell-0 v4"]
    assert after["payments/api-0 v4"] == before["payments/api-0 v4"]


# --- nodes going down ----------------------------------------------------------------------------


def _lab_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egressgw.lab", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_node_taken_down_drops_off_both_networks_and_comes_back(lab: Lab) -> None:
    gateway = gateway_of("analytics")
    name = lab.state.name
    proc = _lab_cli("node-down", "--name", name, gateway.name)
    assert proc.returncode == 0, proc.stderr
    try:
        assert lab.node_is_down(gateway.name)
        assert not _ping(lab, "worker-1", gateway.ipv4)
        assert not _ping(lab, "ext", gateway.uplink_v6)
        status = _lab_cli("status", "--name", name, "--json")
        assert json.loads(status.stdout)["down_nodes"] == [gateway.name]
        text = _lab_cli("status", "--name", name).stdout
        assert f"nodes down: {gateway.name}" in text
    finally:
        proc = _lab_cli("node-up", "--name", name, gateway.name)
    assert proc.returncode == 0, proc.stderr
    assert not lab.node_is_down(gateway.name)
    for where, address in (
        ("worker-1", gateway.ipv4),
        ("worker-2", gateway.ipv6),
        ("ext", gateway.uplink_v4),
        ("ext", gateway.uplink_v6),
    ):
        assert _ping(lab, where, address), f"{where} -> {address}"


# --- the manifests ---------------------------------------------------------------------------


def test_the_manifests_describe_the_cluster_and_pass_policy_check(lab: Lab) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "egressgw", "policy", "check", "--strict", str(lab.manifests_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    objects = [
        doc
        for path in sorted(lab.manifests_dir.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    nodes = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Node"}
    assert sorted(nodes) == sorted(node.name for node in NODES)
    assert nodes["worker-2"]["status"]["addresses"][:2] == [
        {"type": "InternalIP", "address": WORKERS[1].ipv4},
        {"type": "InternalIP", "address": WORKERS[1].ipv6},
    ]
    pods = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Pod"}
    assert {name: pod["spec"]["nodeName"] for name, pod in pods.items()} == {
        pod.name: pod.node for pod in PODS
    }
    for gateway in (o for o in objects if o["kind"] == "EgressGateway"):
        wanted = gateway["spec"]["nodeSelector"]["matchLabels"].items()
        holders = [
            name for name, node in nodes.items() if wanted <= node["metadata"]["labels"].items()
        ]
        project = gateway["spec"]["namespaceSelector"]["matchLabels"]["project"]
        assert holders == [gateway_of(project).name], gateway["metadata"]["name"]
        assert tuple(gateway["spec"]["egressIPs"]) == EGRESS_IPS[project]
    assert (lab.manifests_dir / CLUSTER_FILE).exists()


# --- the demo's tables against a hand-written stand-in for egressgw ----------------------------


def _steering(table: int, project: str) -> dict[int, list[str]]:
    """Policy routes on a worker, per family: a project's pods' traffic leaving the cluster goes
    to its gateway node."""
    gateway = gateway_of(project)
    pods = [pod for pod in PODS if pod.namespace == project]
    return {
        family: [
            f"route add throw {supernet} table {table}",
            f"route add default via {gateway.ipv4 if family == 4 else gateway.ipv6} table {table}",
            *(f"rule add from {pod.address(family)} lookup {table} pref {table}" for pod in pods),
        ]
        for family, supernet in ((4, "192.0.2.0/24"), (6, CLUSTER_SUPERNET_V6))
    }


def _reference_gateway(project: str) -> str:
    """What the example policies mean on a project's gateway once the pods have resolved the
    names, by hand: allow-list, reject the rest, SNAT to the project's egress IPs."""
    pods = [pod for pod in PODS if pod.namespace == project]
    v4 = ", ".join(pod.ipv4 for pod in pods)
    v6 = ", ".join(pod.ipv6 for pod in pods)
    egress_v4, egress_v6 = EGRESS_IPS[project]
    lines = [
        "table inet labtest_reference {",
        "  chain forward_filter {",
        "    type filter hook forward priority filter; policy accept;",
        "    ct state established,related accept",
        f'    oifname "up0" ip saddr {{ {v4} }} ip daddr {DB_V4} tcp dport 5432 accept',
        f'    oifname "up0" ip6 saddr {{ {v6} }} ip6 daddr {DB_V6} tcp dport 5432 accept',
    ]
    if project == "payments":
        # web, www.cdn and origin (through alias), as payments' answers would have opened them
        web4 = ", ".join((WEB_V4, CDN_V4, ORIGIN_V4))
        web6 = ", ".join((WEB_V6, CDN_V6, ORIGIN_V6))
        lines.append(
            f'    oifname "up0" ip saddr {{ {v4} }} ip daddr {{ {web4} }} tcp dport 80 accept'
        )
        lines.append(
            f'    oifname "up0" ip6 saddr {{ {v6} }} ip6 daddr {{ {web6} }} tcp dport 80 accept'
        )
    lines += [
        '    oifname "up0" reject with icmpx admin-prohibited',
        "  }",
        "  chain egress_snat {",
        "    type nat hook postrouting priority srcnat;",
        f'    oifname "up0" ip saddr {{ {v4} }} snat ip to {egress_v4}',
        f'    oifname "up0" ip6 saddr {{ {v6} }} snat ip6 to {egress_v6}',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture
def reference_datapath(lab: Lab) -> Iterator[Lab]:
    """The hand-written stand-in in the lab's workers and gateways; removed afterwards."""
    tables = {"payments": 101, "analytics": 102}
    try:
        for worker in WORKERS:
            for project, table in tables.items():
                for family, commands in _steering(table, project).items():
                    lab.exec(
                        worker.name,
                        ["ip", f"-{family}", "-batch", "-"],
                        input_text="\n".join(commands) + "\n",
                        check=True,
                    )
        for project in tables:
            gateway = gateway_of(project)
            lab.exec(
                gateway.name, ["nft", "-f", "-"], input_text=_reference_gateway(project), check=True
            )
            for address in EGRESS_IPS[project]:
                prefix = "128" if ":" in address else "32"
                lab.exec(
                    gateway.name,
                    ["ip", "addr", "add", f"{address}/{prefix}", "dev", "up0", "nodad"],
                    check=True,
                )
        yield lab
    finally:
        for worker in WORKERS:
            for table in tables.values():
                for option in ("-4", "-6"):
                    lab.exec(worker.name, ["ip", option, "rule", "flush", "table", str(table)])
                    lab.exec(worker.name, ["ip", option, "route", "flush", "table", str(table)])
        for project in tables:
            gateway = gateway_of(project)
            lab.exec(gateway.name, ["nft", "delete", "table", "inet", "labtest_reference"])
            for address in EGRESS_IPS[project]:
                prefix = "128" if ":" in address else "32"
                lab.exec(gateway.name, ["ip", "addr", "del", f"{address}/{prefix}", "dev", "up0"])


def test_the_demo_tables_hold_against_a_hand_written_datapath(reference_datapath: Lab) -> None:
    # No egressgw, so no DNS interception: the connection verdicts and sources only.
    lab = reference_datapath
    results = run_checks(lab, timeout_s=2, resolve=False)
    assert all(r.ok for r in results), "\n" + format_table(results)
    assert len(results) == len(EXPECTED) == 28
    gateway = gateway_of("payments")
    lab.take_node_down(gateway.name)
    try:
        down_results = run_checks(lab, FAILOVER, timeout_s=2, resolve=False)
    finally:
        lab.bring_node_up(gateway.name)
    assert all(r.ok for r in down_results), "\n" + format_table(down_results)
    back = run_checks(lab, RECOVERED, timeout_s=2, resolve=False)
    assert all(r.ok for r in back), "\n" + format_table(back)


def test_a_gateway_reject_fails_fast_with_the_kernels_error(reference_datapath: Lab) -> None:
    lab = reference_datapath
    v4 = lab.http("payments/api-1", lab.web_url(4, 8080))
    assert v4.verdict is Verdict.REJECTED_AT_GATEWAY, v4
    assert "No route to host" in v4.detail and v4.elapsed_s < 1.0
    # ICMPv6 admin-prohibited is EACCES. Here the first error reaches the client while connect()
    # still holds the socket (all namespaces share one softirq), so it counts after one SYN
    # retransmission, about a second: slower than IPv4, still far from a timeout.
    v6 = lab.http("payments/api-1", lab.web_url(6, 8080))
    assert v6.verdict is Verdict.REJECTED_AT_GATEWAY, v6
    assert "Permission denied" in v6.detail and v6.elapsed_s < 2.5


# --- the lab's own life cycle ------------------------------------------------------------------


def test_up_refuses_a_second_lab_of_the_same_name_and_leaves_the_first(lab: Lab) -> None:
    with pytest.raises(LabError, match="already up"):
        Lab.up(lab.state.name, start_daemon=False)
    assert lab_module.is_alive(lab.state.name)
    assert lab.psql("gateway-1", DB_V4).verdict is Verdict.REFUSED_BY_SERVER


def test_status_from_another_process(lab: Lab) -> None:
    proc = _lab_cli("status", "--name", lab.state.name)
    assert proc.returncode == 0, proc.stderr
    for ns in lab.names.all():
        assert f"{ns} " in proc.stdout
    assert "postgres" in proc.stdout and "cluster-dns" in proc.stdout and "DEAD" not in proc.stdout
    assert "192.0.2.10/26" in proc.stdout and "198.51.100.100/24" in proc.stdout


def _leftovers(name: str, pids: list[int]) -> list[str]:
    found = [ns for ns in NetnsNames(name).all() if Path("/run/netns", ns).exists()]
    found += [d.name for d in NETNS_ETC_DIR.glob(f"{name}-*")] if NETNS_ETC_DIR.exists() else []
    # A zombie counts as gone: the test process is the parent and reaps it later.
    found += [f"pid {pid}" for pid in pids if pid_alive(pid)]
    if Path("/run/egressgw-lab", name).exists():
        found.append("statedir")
    return found


def test_down_removes_everything_and_is_idempotent() -> None:
    require_kernel()
    name = unique_name("egt")
    start = time.monotonic()
    built = Lab.up(name, start_daemon=False)
    up_s = time.monotonic() - start
    try:
        pids = [record.pid for record in built.state.processes.values()]
        assert len(pids) == SERVER_PROCESSES
        start = time.monotonic()
        removed = down(name)
        down_s = time.monotonic() - start
        assert any("postgres" in item for item in removed)
        assert _leftovers(name, pids) == []
        assert down(name) == []
        print(f"lab up {up_s:.2f}s, down {down_s:.2f}s")
    finally:
        built.down()


def test_down_without_a_state_file_still_removes_the_lab_by_name() -> None:
    require_kernel()
    name = unique_name("egt")
    built = Lab.up(name, start_daemon=False)
    try:
        pids = [record.pid for record in built.state.processes.values()]
        os.unlink(built.state.path)
        proc = _lab_cli("down", "--name", name)
        assert proc.returncode == 0, proc.stderr
        # The servers went with their namespace: found by `ip netns pids`, stopped by pid.
        assert _leftovers(name, pids) == []
    finally:
        built.down()


def test_a_failure_during_up_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    require_kernel()

    def fail(self: services.Postgres) -> None:
        raise LabError("injected failure while creating the database")

    monkeypatch.setattr(services.Postgres, "create_database", fail)
    name = unique_name("egt")
    try:
        with pytest.raises(LabError, match="injected failure"):
            Lab.up(name, start_daemon=False)
        assert _leftovers(name, []) == []
    finally:
        down(name)


def test_lab_names_that_could_clash_are_refused() -> None:
    for bad in ("", "Egl", "egl_1", "egl--1", "-egl", "x" * 25, "egl/../etc"):
        with pytest.raises(ValueError):
            Lab.attach(bad)
