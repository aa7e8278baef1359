"""The lab without the daemon: its network, its servers, its leak counters, and its removal.

One lab serves the module (about a second to build). A hand-written nftables ruleset stands in for
the daemon where a test needs SNAT, so the lab and the demo's expectations are checked on their own;
the end-to-end tests with the real daemon are in test_lab_e2e.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from egressgw.lab import Lab, LabError, Verdict, down, services
from egressgw.lab import lab as lab_module
from egressgw.lab.demo import EXPECTED, format_table, run_checks
from egressgw.lab.lab import url
from egressgw.lab.netns import NETNS_ETC_DIR, pid_alive
from egressgw.lab.topology import (
    BRIDGE_V4,
    BRIDGE_V6,
    CDN_V4,
    CDN_V6,
    DB_V4,
    DB_V6,
    DNS_BLACKHOLE_V4,
    DNS_BLACKHOLE_V6,
    DNS_DEAD_V4,
    DNS_DEAD_V6,
    DNS_V4,
    DNS_V6,
    EGRESS_IPS,
    GATEWAY_NODE_V4,
    GATEWAY_NODE_V6,
    MANY_ADDRESS_COUNT,
    MANY_NAME,
    ORIGIN_V4,
    ORIGIN_V6,
    PODS,
    RACE_NAME_COUNT,
    SHORT_NAME,
    SHORT_TTL_SECONDS,
    SHORT_V4,
    TEST_PORT,
    TRANSIT_GATEWAY_V4,
    TRANSIT_GATEWAY_V6,
    WEB_ADDRESSES,
    WEB_V4,
    WEB_V6,
    NetnsNames,
    many_addresses,
    race_address,
    race_name,
)
from tests.conftest import require_kernel, unique_name

pytestmark = pytest.mark.kernel


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


@pytest.mark.parametrize("pod", [pod.key for pod in PODS])
def test_every_pod_reaches_the_worker_bridge_and_the_gateway(lab: Lab, pod: str) -> None:
    for address in (BRIDGE_V4, BRIDGE_V6, TRANSIT_GATEWAY_V4, TRANSIT_GATEWAY_V6):
        assert _ping(lab, pod, address), f"{pod} cannot reach {address}"


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("port", [80, 8080])
def test_echo_server_reports_the_gateway_node_address(lab: Lab, family: int, port: int) -> None:
    outcome = lab.http("gw", lab.web_url(family, port))
    assert outcome.verdict is Verdict.CONNECTED, outcome
    assert outcome.source == (GATEWAY_NODE_V4 if family == 4 else GATEWAY_NODE_V6)
    assert f"source={outcome.source}" in lab.http_log()


@pytest.mark.parametrize("server", [DNS_V4, DNS_V6])
def test_dns_server_answers_the_lab_records(lab: Lab, server: str) -> None:
    def ask(name: str, qtype: str = "A", tcp: bool = False) -> str:
        result = lab.dns_query("gw", name, qtype, server=server, tcp=tcp)
        records = " ".join(f"{t}={d}" for _n, t, _ttl, d in result.answers)
        return f"{result.rcode} {records}".strip()

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
    short = lab.dns_query("gw", SHORT_NAME, "A", server=server)
    assert short.addresses == (SHORT_V4,) and short.ttls("A") == [SHORT_TTL_SECONDS]
    # Far over the interceptor's per-name cap; too big for UDP, whole over TCP.
    many = lab.dns_query("gw", MANY_NAME, "AAAA", server=server, tcp=True)
    assert sorted(many.addresses) == sorted(many_addresses())
    assert len(many.addresses) == MANY_ADDRESS_COUNT
    assert "query[A] alias.lab.example" in lab.dns_log()


@pytest.mark.parametrize(
    ("dead", "blackhole"), [(DNS_DEAD_V4, DNS_BLACKHOLE_V4), (DNS_DEAD_V6, DNS_BLACKHOLE_V6)]
)
def test_dead_and_blackhole_dns_servers_fail_as_designed(
    lab: Lab, dead: str, blackhole: str
) -> None:
    """The failover tests' upstreams: one refuses at once (ICMP), one never answers."""
    refused = lab.dns_query("gw", "db.lab.example", server=dead, timeout_s=2)
    assert refused.rcode == "ERROR" and "refused" in refused.error.lower(), refused
    assert refused.elapsed_ms < 500
    silent = lab.dns_query("gw", "db.lab.example", server=blackhole, timeout_s=1)
    assert silent.rcode == "TIMEOUT", silent


def test_every_address_of_the_anyip_prefix_and_the_web_addresses_accept(lab: Lab) -> None:
    for address in (race_address(0), race_address(RACE_NAME_COUNT - 1), many_addresses()[-1]):
        outcome = lab.http("gw", url(address, TEST_PORT))
        assert outcome.verdict is Verdict.CONNECTED, (address, outcome)
        assert outcome.source == GATEWAY_NODE_V6
    outcome = lab.http("gw", url(SHORT_V4, TEST_PORT))
    assert outcome.verdict is Verdict.CONNECTED and outcome.source == GATEWAY_NODE_V4, outcome
    for address in WEB_ADDRESSES:
        outcome = lab.http("gw", url(address, 80))
        assert outcome.verdict is Verdict.CONNECTED, (address, outcome)


@pytest.mark.parametrize(
    ("host", "source"), [(DB_V4, GATEWAY_NODE_V4), (DB_V6, GATEWAY_NODE_V6)], ids=["v4", "v6"]
)
def test_postgres_refuses_a_source_missing_from_pg_hba(lab: Lab, host: str, source: str) -> None:
    outcome = lab.psql("gw", host)
    assert outcome.verdict is Verdict.REFUSED_BY_SERVER, outcome
    assert outcome.source == source
    assert f'no pg_hba.conf entry for host "{source}"' in lab.pg_log()
    assert f"connection received: host={source}" in lab.pg_log()


def test_traffic_that_escapes_without_snat_gets_no_reply_and_is_counted(lab: Lab) -> None:
    # No daemon: the gateway forwards the pod's packets as they are. The external network has no
    # route back, so the client times out, and the leak counters see the pod's own address.
    before = lab.leaked_packets()
    outcome = lab.http("sandbox/shell-0", lab.web_url(4, 80), timeout_s=1)
    assert outcome.verdict is Verdict.TIMEOUT, outcome
    after = lab.leaked_packets()
    assert after["sandbox/shell-0 v4"] > before["sandbox/shell-0 v4"]
    assert after["payments/api-0 v4"] == before["payments/api-0 v4"]


def _reference_datapath() -> str:
    """What the example policies mean once the pods have resolved the names, by hand: SNAT per
    project, allow-list, reject the rest."""
    api, etl = PODS[0], PODS[1]
    pay4, pay6 = EGRESS_IPS["payments"]
    ana4, ana6 = EGRESS_IPS["analytics"]
    # web, www.cdn and origin (through alias), as payments' answers would have opened them
    web4 = ", ".join((WEB_V4, CDN_V4, ORIGIN_V4))
    web6 = ", ".join((WEB_V6, CDN_V6, ORIGIN_V6))
    return f"""
table inet labtest_reference {{
  chain forward_filter {{
    type filter hook forward priority filter; policy accept;
    ct state established,related accept
    iifname "tr0" ip saddr {{ {api.ipv4}, {etl.ipv4} }} ip daddr {DB_V4} tcp dport 5432 accept
    iifname "tr0" ip6 saddr {{ {api.ipv6}, {etl.ipv6} }} ip6 daddr {DB_V6} tcp dport 5432 accept
    iifname "tr0" ip saddr {api.ipv4} ip daddr {{ {web4} }} tcp dport 80 accept
    iifname "tr0" ip6 saddr {api.ipv6} ip6 daddr {{ {web6} }} tcp dport 80 accept
    iifname "tr0" reject with icmpx admin-prohibited
  }}
  chain egress_snat {{
    type nat hook postrouting priority srcnat;
    oifname "up0" ip saddr {api.ipv4} snat ip to {pay4}
    oifname "up0" ip6 saddr {api.ipv6} snat ip6 to {pay6}
    oifname "up0" ip saddr {etl.ipv4} snat ip to {ana4}
    oifname "up0" ip6 saddr {etl.ipv6} snat ip6 to {ana6}
  }}
}}
"""


@pytest.fixture
def reference_datapath(lab: Lab) -> Iterator[Lab]:
    """The hand-written ruleset and the egress IPs in the lab's gateway; removed afterwards."""
    addresses = [f"{a}/32" for a, _ in EGRESS_IPS.values()]
    addresses += [f"{a}/128" for _, a in EGRESS_IPS.values()]
    lab.exec("gw", ["nft", "-f", "-"], input_text=_reference_datapath(), check=True)
    try:
        for address in addresses:
            lab.exec("gw", ["ip", "addr", "add", address, "dev", "up0", "nodad"], check=True)
        yield lab
    finally:
        for address in addresses:
            lab.exec("gw", ["ip", "addr", "del", address, "dev", "up0"])
        lab.exec("gw", ["nft", "delete", "table", "inet", "labtest_reference"])


def test_demo_expectations_hold_against_a_hand_written_datapath(reference_datapath: Lab) -> None:
    # No daemon, so no DNS interceptor: the connection verdicts only.
    results = run_checks(reference_datapath, timeout_s=2, resolve=False)
    assert all(r.ok for r in results), "\n" + format_table(results)
    assert len(results) == len(EXPECTED) == 20


def test_a_gateway_reject_fails_fast_with_the_kernels_error(reference_datapath: Lab) -> None:
    lab = reference_datapath
    v4 = lab.http("payments/api-0", lab.web_url(4, 8080))
    assert v4.verdict is Verdict.REJECTED_AT_GATEWAY, v4
    assert "No route to host" in v4.detail and v4.elapsed_s < 1.0
    # ICMPv6 admin-prohibited is EACCES. Here the first error reaches the client while connect()
    # still holds the socket (all namespaces share one softirq), so it counts after one SYN
    # retransmission, about a second: slower than IPv4, still far from a timeout.
    v6 = lab.http("payments/api-0", lab.web_url(6, 8080))
    assert v6.verdict is Verdict.REJECTED_AT_GATEWAY, v6
    assert "Permission denied" in v6.detail and v6.elapsed_s < 2.5


def test_up_refuses_a_second_lab_of_the_same_name_and_leaves_the_first(lab: Lab) -> None:
    with pytest.raises(LabError, match="already up"):
        Lab.up(lab.state.name, start_daemon=False)
    assert lab_module.is_alive(lab.state.name)
    assert lab.psql("gw", DB_V4).verdict is Verdict.REFUSED_BY_SERVER


def test_status_from_another_process(lab: Lab) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "egressgw.lab", "status", "--name", lab.state.name],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for ns in lab.names.all():
        assert f"{ns} " in proc.stdout
    assert "postgres" in proc.stdout and "DEAD" not in proc.stdout
    assert "192.0.2.10/25" in proc.stdout and "198.51.100.2/24" in proc.stdout


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
        assert len(pids) == 3
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
        proc = subprocess.run(
            [sys.executable, "-m", "egressgw.lab", "down", "--name", name],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
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
