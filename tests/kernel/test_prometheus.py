"""A real Prometheus scrapes the lab's gateways; every dashboard query and alert expression is run.

Each gateway node's daemon listens on 0.0.0.0:9460, as the DaemonSet's does; Prometheus (Debian's
package) runs inside gateway-1's namespace and scrapes both gateway nodes at their node addresses
every second, as the ServiceMonitor would: payments' traffic is seen by gateway-1, analytics' by
gateway-2, and an egress IP is held when one of them holds it. The test first waits for a scrape
of each, then drives allowed and denied DNS, accepted and rejected connections, a query from a
source that is no workload, a name over the per-name address cap, an upstream that refuses
(listed first) and an invalid policy, and then asks Prometheus' HTTP API for every panel query of
``manifests/monitoring/grafana-dashboard.json`` (each must return data) and every alert
expression of ``prometheusrule.yaml`` (each must parse). The operator CLI is run against
gateway-1's daemon from inside its namespace.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from egressgw.datapath.netns import call_in
from egressgw.lab import Lab
from egressgw.lab.services import DNS_UPSTREAMS, daemon_available
from egressgw.lab.topology import (
    DB_V4,
    DNS_DEAD_V4,
    DNS_PORT,
    EGRESS_IPS,
    GATEWAYS,
    MANY_NAME,
    gateway_of,
)
from tests.conftest import require, require_kernel, unique_name

pytestmark = pytest.mark.kernel

MONITORING = Path(__file__).parent.parent.parent / "manifests" / "monitoring"
PROMETHEUS = "127.0.0.1:9090"  # inside gateway-1's namespace
DAEMON = "http://127.0.0.1:9460"  # gateway-1's daemon, from inside its namespace
METRICS_PORT = 9460
# every gateway node's daemon, at its node address (the DaemonSet's --http-listen)
TARGETS = [f"{gateway.ipv4}:{METRICS_PORT}" for gateway in GATEWAYS]
PAYMENTS, ANALYTICS = "payments/api-0", "analytics/etl-0"
BROKEN_POLICY = """\
apiVersion: egressgw.io/v1alpha1
kind: EgressPolicy
metadata: {name: broken, namespace: payments}
spec:
  podSelector: {}
  egress:
    - to: [{cidr: 203.0.113.0/33}]
"""


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, with Grafana's variables filled in."""
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$namespace", ".*")
            found.append((panel["title"], expr))
    return found


def alert_rules() -> list[dict[str, Any]]:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


class Prometheus:
    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.ns = lab.netns_of("gw")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "egressgw", "static_configs": [{"targets": TARGETS}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        argv = ["ip", "netns", "exec", self.ns, "prometheus"]
        argv += [f"--config.file={workdir / 'prometheus.yml'}"]
        argv += [f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address={PROMETHEUS}"]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def query(self, expr: str) -> dict[str, Any]:
        """The API's whole answer (status, data or error); an HTTP error's body too."""
        url = f"http://{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": expr})

        def ask() -> dict[str, Any]:
            try:
                with urllib.request.urlopen(url, timeout=5) as reply:
                    body: dict[str, Any] = json.load(reply)
            except urllib.error.HTTPError as exc:
                body = json.load(exc)
            return body

        return call_in(self.ns, ask)

    def wait_for(self, expr: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{self.log.read_text()}")
            try:
                result: list[dict[str, Any]] = self.query(expr)["data"]["result"]
            except OSError:
                result = []
            if result:
                return result
            time.sleep(0.25)
        raise AssertionError(f"no data for {expr} within {timeout_s:g}s")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_kernel()
    require(daemon_available(), "`python -m egressgw run` is not available")
    require(shutil.which("prometheus") is not None, "needs prometheus (Debian package)")
    args = ["--http-listen", f"0.0.0.0:{METRICS_PORT}"]  # reached at the node address
    args += ["--upstream", f"{DNS_DEAD_V4}:{DNS_PORT}"]  # refuses: counted, then the next
    for upstream in DNS_UPSTREAMS:
        args += ["--upstream", upstream]
    with Lab.up(unique_name("egp"), daemon_args=args) as built:
        yield built


@pytest.fixture(scope="module")
def prometheus(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    server = Prometheus(lab, tmp_path_factory.mktemp("prometheus"))
    try:
        ups = server.wait_for('up{job="egressgw"} == 1')
        deadline = time.monotonic() + 30
        while {s["metric"]["instance"] for s in ups} != set(TARGETS):
            assert time.monotonic() < deadline, f"not every gateway is scraped: {ups}"
            time.sleep(0.25)
            ups = server.wait_for('up{job="egressgw"} == 1')
        drive_traffic(lab)
        yield server
    finally:
        server.stop()


def drive_traffic(lab: Lab) -> None:
    """Two rounds a few scrapes apart, so every rate() window sees an increase."""
    since = {gateway.name: lab.daemon_log_offset(node=gateway.name) for gateway in GATEWAYS}
    lab.write_manifest("zz-broken.yaml", BROKEN_POLICY)
    for node, offset in since.items():
        lab.wait_for_daemon_log("broken", since=offset, node=node)
    # A node is no workload: payments' gateway, asked at its node address, refuses it.
    interceptor = gateway_of("payments").ipv4
    for _ in range(2):
        assert lab.dns_query(PAYMENTS, "db.lab.example").rcode == "NOERROR"
        assert lab.dns_query(PAYMENTS, "db.lab.example").rcode == "NOERROR"  # a cache hit
        assert lab.dns_query(PAYMENTS, "web.lab.example").rcode == "NOERROR"
        assert lab.dns_query(PAYMENTS, "blocked.lab.example").rcode == "NXDOMAIN"
        assert lab.dns_query(ANALYTICS, "web.lab.example").rcode == "NXDOMAIN"
        assert lab.dns_query("worker-1", "db.lab.example", server=interceptor).rcode == "REFUSED"
        assert lab.dns_query(PAYMENTS, MANY_NAME, "AAAA", tcp=True).rcode == "NOERROR"
        assert lab.psql(PAYMENTS, DB_V4, "select 1").output == "1"  # accepted
        lab.http(PAYMENTS, lab.web_url(4, 8080), timeout_s=2)  # rejected: port outside policy
        time.sleep(3)


def test_every_dashboard_query_returns_data(prometheus: Prometheus) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    empty = []
    for title, expr in queries:
        answer = prometheus.query(expr)
        assert answer["status"] == "success", (title, expr, answer.get("error"))
        if not answer["data"]["result"]:
            try:
                prometheus.wait_for(expr, timeout_s=15)
            except AssertionError:
                empty.append(f"{title}: {expr}")
    assert empty == []
    print(f"evaluated {len(queries)} dashboard queries; all returned data")


def test_every_alert_expression_parses_and_the_driven_ones_fire(prometheus: Prometheus) -> None:
    rules = alert_rules()
    assert len(rules) >= 8
    results = {}
    for rule in rules:
        answer = prometheus.query(rule["expr"])
        assert answer["status"] == "success", (rule["alert"], answer.get("error"))
        results[rule["alert"]] = answer["data"]["result"]
    # conditions the test created: a name over the per-name cap, an invalid policy
    capped = prometheus.wait_for(
        next(r["expr"] for r in rules if r["alert"] == "EgressAddressCapHit")
    )
    assert {(s["metric"]["namespace"], s["metric"]["cap"]) for s in capped} == {
        ("payments", "name")
    }
    invalid = results["EgressInvalidPolicies"]
    assert [(s["metric"]["kind"], s["metric"]["namespace"]) for s in invalid] == [
        ("EgressPolicy", "payments")
    ]
    assert results["EgressGatewayDown"] == [] and results["EgressIPNotHeld"] == []
    print(f"evaluated {len(rules)} alert expressions")


def test_traffic_and_denials_are_counted_per_namespace(prometheus: Prometheus) -> None:
    rejected = prometheus.wait_for(
        'egressgw_traffic_packets_total{namespace="payments",verdict="rejected"} > 0'
    )
    assert len(rejected) == 1
    denials = prometheus.wait_for("egressgw_dns_denials_total > 0")
    # payments' denials at gateway-1, analytics' at gateway-2; the node's query is refused as
    # from an unknown source (no namespace)
    found = {(s["metric"].get("namespace", ""), s["metric"]["instance"]) for s in denials}
    gw1, gw2 = TARGETS
    assert found == {("payments", gw1), ("analytics", gw2), ("", gw1)}


def run_cli(lab: Lab, *argv: str) -> subprocess.CompletedProcess[str]:
    return lab.exec("gw", [sys.executable, "-m", "egressgw", *argv, "--url", DAEMON], timeout=20)


def test_operator_cli_against_the_running_gateway(lab: Lab, prometheus: Prometheus) -> None:
    ips = run_cli(lab, "egress-ips", "--format", "json")
    assert ips.returncode == 0, ips.stderr
    held = {
        (g["gateway"], ip["address"]): (ip["held"], ip["node"])
        for g in json.loads(ips.stdout)["gateways"]
        for ip in g["egressIPs"]
    }
    # gateway-1 holds payments' egress IPs; analytics' are held by the other gateway node, and
    # the report says which
    assert held == {
        **{("payments", ip): (True, "gateway-1") for ip in EGRESS_IPS["payments"]},
        **{("analytics", ip): (False, "gateway-2") for ip in EGRESS_IPS["analytics"]},
    }
    allowed = run_cli(
        lab, "explain", "--namespace", "payments", "--pod", "api-0", "--host", "db.lab.example",
        "--port", "5432",
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr
    assert "rule:       payments/database#0" in allowed.stdout.splitlines()
    denied = run_cli(
        lab, "explain", "--namespace", "analytics", "--ip", "192.0.2.20", "--host",
        "web.lab.example",
    )  # fmt: skip
    assert denied.returncode == 1
    unknown = run_cli(
        lab, "explain", "--namespace", "payments", "--pod", "api-7", "--host", "db.lab.example"
    )
    assert unknown.returncode == 2
    assert "no pod 'api-7' in namespace 'payments' (pods there: api-0, api-1)" in unknown.stderr

    def decisions() -> dict[str, Any]:
        with urllib.request.urlopen(f"{DAEMON}/v1/decisions?namespace=payments") as reply:
            body: dict[str, Any] = json.load(reply)
        return body

    recent = call_in(lab.netns_of("gw"), decisions)["decisions"]
    newest = recent[0]
    assert (newest["pod"], newest["name"], newest["verdict"], newest["reason"]) == (
        "api-0",
        "blocked.lab.example",
        "deny",
        'no rule matches; EgressGateway "payments" defaultAction is Deny',
    )
