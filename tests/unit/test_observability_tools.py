"""``egressgw egress-ips`` and ``egressgw explain`` from manifests, and the daemon's operator API.

The cluster is ``tests/testdata/observability``: payments (Enforce) with two namespaces and two
egress IPs, analytics (Audit) with one, and a sandbox namespace no gateway selects.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import Sequence
from ipaddress import ip_address
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from egressgw.cli import main
from egressgw.explain import Explanation, Query, explain
from egressgw.policy.load import load_paths
from egressgw.report import gateway_egress, to_json
from egressgw.web import Health, NotReady, Operator, make_app
from tests.conftest import run_cli

CLUSTER = Path(__file__).parent.parent / "testdata" / "observability"
SNAPSHOT = load_paths([CLUSTER]).snapshot


run = run_cli


# -- egress-ips -------------------------------------------------------------------------------


def test_egress_ips_table_lists_every_gateway_ip_with_its_namespaces(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, "egress-ips", "--manifests", str(CLUSTER))
    assert (code, err) == (0, "")
    lines = [line.split() for line in out.splitlines()]
    assert lines[0] == ["GATEWAY", "NAMESPACES", "EGRESS", "IP", "FAMILY", "HELD", "NODE"]
    assert lines[1:] == [
        ["analytics", "analytics", "198.51.100.20", "IPv4", "unknown", "-"],
        ["payments", "payments", "payments-batch", "198.51.100.10", "IPv4", "unknown", "-"],
        ["payments", "payments", "payments-batch", "2001:db8:100::10", "IPv6", "unknown", "-"],
    ]


def test_egress_ips_json_is_what_automation_reads(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "egress-ips", "--manifests", str(CLUSTER), "--format", "json")
    assert code == 0
    body = json.loads(out)
    payments = next(g for g in body["gateways"] if g["gateway"] == "payments")
    assert payments["namespaces"] == ["payments", "payments-batch"]
    assert [ip["address"] for ip in payments["egressIPs"]] == ["198.51.100.10", "2001:db8:100::10"]
    assert {ip["held"] for ip in payments["egressIPs"]} == {None}  # manifests cannot know


def test_egress_ips_csv_has_one_row_per_address(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "egress-ips", "--manifests", str(CLUSTER), "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    allowlist = sorted(r["egress_ip"] for r in rows if r["gateway"] == "payments")
    assert allowlist == ["198.51.100.10", "2001:db8:100::10"]
    assert rows[0] == {
        "gateway": "analytics",
        "namespaces": "analytics",
        "egress_ip": "198.51.100.20",
        "family": "IPv4",
        "held": "unknown",
        "node": "-",
    }


def test_egress_ips_from_a_missing_directory_says_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run(capsys, "egress-ips", "--manifests", str(tmp_path / "nope"))
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"egressgw egress-ips: --manifests {tmp_path / 'nope'}: no such file or directory"
    ]


# -- explain ----------------------------------------------------------------------------------


def explain_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    return run(capsys, "explain", *argv, "--manifests", str(CLUSTER))


def fields(out: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        found.setdefault(key, value.strip())
    return found


def test_explain_allowed_names_the_rule(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("--namespace", "payments", "--pod", "api-0", "--host", "db.example.com", "--port")
    code, out, _ = explain_cli(capsys, *argv, "5432")
    assert code == 0
    got = fields(out)
    assert got["verdict"] == "Allow"
    assert got["reason"] == 'name matched fqdn "db.example.com" in Allow rule payments/database#0'
    assert got["rule"] == "payments/database#0"
    assert got["egress IPs"] == "198.51.100.10, 2001:db8:100::10"


def test_explain_denied_by_a_deny_rule_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = explain_cli(
        capsys, "--namespace", "payments", "--ip", "2001:db8:1::10", "--host", "a.paste.example.com"
    )
    assert code == 1
    got = fields(out)
    assert got["verdict"] == "Deny"
    assert got["rule"] == "payments/database#1"
    assert got["workload"] == "payments/api-0 (192.0.2.10, 2001:db8:1::10)"


def test_explain_port_outside_the_rule_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = explain_cli(
        capsys, "--namespace", "payments", "--pod", "api-0", "--address", "203.0.113.10",
        "--port", "443",
    )  # fmt: skip
    assert code == 1
    assert fields(out)["reason"] == (
        "address matched cidr 203.0.113.10/32 in Allow rule payments/database#0 but not its "
        'ports (TCP/443); EgressGateway "payments" defaultAction is Deny'
    )


def test_explain_audit_passes_and_says_it_would_be_denied(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = explain_cli(
        capsys, "--namespace", "analytics", "--pod", "etl-0", "--host", "db.example.com",
        "--port", "5432",
    )  # fmt: skip
    assert code == 0
    got = fields(out)
    assert got["verdict"] == "Audit"
    assert got["reason"] == (
        'Audit mode, would be denied: no rule matches; EgressGateway "analytics" defaultAction '
        "is Deny"
    )
    assert "logged and counted as would-be denied" in got["note"]


def test_explain_workload_without_gateway_is_denied(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = explain_cli(
        capsys, "--namespace", "sandbox", "--pod", "shell-0", "--host", "db.example.com"
    )
    assert code == 1
    assert fields(out)["reason"] == "no EgressGateway selects this workload"


@pytest.mark.parametrize(
    ("who", "message"),
    [
        (
            ("--pod", "api-9"),
            "egressgw explain: no pod 'api-9' in namespace 'payments' (pods there: api-0)\n",
        ),
        (
            ("--ip", "192.0.2.99"),
            "egressgw explain: no pod has IP 192.0.2.99; the gateway rejects traffic from "
            "addresses that are not workloads\n",
        ),
        (
            ("--ip", "192.0.2.20"),
            "egressgw explain: 192.0.2.20 is pod analytics/etl-0, not in namespace 'payments'\n",
        ),
    ],
    ids=["no-such-pod", "no-such-ip", "ip-of-another-namespace"],
)
def test_explain_unknown_workload_is_a_clear_answer(
    capsys: pytest.CaptureFixture[str], who: Sequence[str], message: str
) -> None:
    code, out, err = explain_cli(capsys, "--namespace", "payments", *who, "--host", "x.example")
    assert (code, out, err) == (2, "", message)


def test_explain_address_without_port_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = explain_cli(
        capsys, "--namespace", "payments", "--pod", "api-0", "--address", "203.0.113.10"
    )
    assert code == 2
    assert "an address needs a port" in err


def test_explain_json_round_trips() -> None:
    answer = explain(SNAPSHOT, Query("payments", pod="api-0", host="db.example.com", port=5432))
    assert Explanation.from_json(json.loads(json.dumps(answer.to_json()))) == answer


# -- the daemon's operator API, and the CLI reading it with --url -----------------------------


class FakeDaemon:
    def __init__(self) -> None:
        self.ready = False
        self.denials: list[dict[str, object]] = [
            {"namespace": "payments", "name": f"n{i}.example", "verdict": "deny"} for i in range(3)
        ]
        self.denials.append({"namespace": "analytics", "name": "x.example", "verdict": "deny"})

    def reason(self) -> str | None:
        return None if self.ready else "desired state not loaded yet"

    def egress_ips(self) -> dict[str, object]:
        if not self.ready:
            raise NotReady("desired state not loaded yet")
        # this daemon (gw-1) holds payments' IPv4 address; gw-2 holds its IPv6 one; analytics'
        # holder is not known here
        held = {"198.51.100.10"}
        holders = {ip_address("198.51.100.10"): "gw-1", ip_address("2001:db8:100::10"): "gw-2"}
        rows = gateway_egress(SNAPSHOT, lambda _g, a: str(a) in held, holders=holders)
        return to_json(rows)

    def explain(self, query: Query) -> Explanation:
        if not self.ready:
            raise NotReady("desired state not loaded yet")
        return explain(SNAPSHOT, query)

    def app(self) -> Operator:
        return Operator(self.egress_ips, self.explain, lambda: self.denials, 256)


async def _with_client(daemon: FakeDaemon, test: object) -> None:
    app = make_app(Health(lambda: True, daemon.reason), daemon.app())
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        await test(client)  # type: ignore[operator]


def test_operator_api_before_and_after_the_first_sync() -> None:
    daemon = FakeDaemon()

    async def check(client: TestClient) -> None:  # type: ignore[type-arg]
        reply = await client.get("/readyz")
        assert reply.status == 503
        assert await reply.text() == "not ready: desired state not loaded yet\n"
        reply = await client.get("/v1/egress-ips")
        assert reply.status == 503
        assert await reply.json() == {"error": "desired state not loaded yet"}
        daemon.ready = True
        assert (await client.get("/readyz")).status == 200
        body = await (await client.get("/v1/egress-ips")).json()
        payments = next(g for g in body["gateways"] if g["gateway"] == "payments")
        assert [(i["address"], i["held"], i["node"]) for i in payments["egressIPs"]] == [
            ("198.51.100.10", True, "gw-1"),
            ("2001:db8:100::10", False, "gw-2"),
        ]
        analytics = next(g for g in body["gateways"] if g["gateway"] == "analytics")
        assert [(i["held"], i["node"]) for i in analytics["egressIPs"]] == [(False, None)]
        params = {"namespace": "payments", "pod": "api-0", "host": "db.example.com"}
        reply = await client.get("/v1/explain", params={**params, "port": "5432"})
        assert reply.status == 200
        assert (await reply.json())["rule"] == "payments/database#0"
        reply = await client.get("/v1/explain", params={**params, "pod": "nope"})
        assert reply.status == 404
        assert "no pod 'nope'" in (await reply.json())["error"]
        reply = await client.get("/v1/explain", params={**params, "port": "http"})
        assert (reply.status, await reply.json()) == (
            400,
            {"error": "port must be a number, got 'http'"},
        )
        reply = await client.get("/v1/explain", params={**params, "port": "\u00b2"})  # a digit
        assert (reply.status, await reply.json()) == (
            400,
            {"error": "port must be a number, got '\u00b2'"},
        )
        reply = await client.get("/v1/decisions", params={"limit": "\u00b2"})  # not 500
        assert (reply.status, await reply.json()) == (
            400,
            {"error": "limit must be a number, got '\u00b2'"},
        )
        reply = await client.get("/v1/decisions", params={"limit": "2"})
        body = await reply.json()
        assert [d["name"] for d in body["decisions"]] == ["x.example", "n2.example"]  # newest first
        assert body["kept"] == 256
        reply = await client.get("/v1/decisions", params={"namespace": "payments"})
        assert len((await reply.json())["decisions"]) == 3

    asyncio.run(_with_client(daemon, check))


def test_cli_reads_a_running_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    daemon = FakeDaemon()
    daemon.ready = True
    results: list[tuple[int, str, str]] = []

    async def check(client: TestClient) -> None:  # type: ignore[type-arg]
        url = str(client.make_url("/"))
        for argv in (
            ("egress-ips", "--url", url, "--format", "csv"),
            ("explain", "--namespace", "payments", "--pod", "api-0", "--host",
             "a.paste.example.com", "--url", url),
            ("explain", "--namespace", "payments", "--pod", "api-9", "--host", "x.example",
             "--url", url),
        ):  # fmt: skip
            code = await asyncio.to_thread(main, list(argv))
            out, err = capsys.readouterr()
            results.append((code, out, err))

    asyncio.run(_with_client(daemon, check))
    (ips_code, ips, _), (deny_code, deny, _), (unknown_code, _, unknown) = results
    assert ips_code == 0
    assert ips.splitlines()[1:] == [
        "analytics,analytics,198.51.100.20,IPv4,no,-",
        "payments,payments payments-batch,198.51.100.10,IPv4,yes,gw-1",
        "payments,payments payments-batch,2001:db8:100::10,IPv6,no,gw-2",
    ]
    assert deny_code == 1 and fields(deny)["rule"] == "payments/database#1"
    assert unknown_code == 2
    assert "404: no pod 'api-9' in namespace 'payments' (pods there: api-0)" in unknown


def test_cli_says_when_the_daemon_cannot_be_reached(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "egress-ips", "--url", "http://127.0.0.1:9")
    assert (code, out) == (2, "")
    assert err.startswith("egressgw egress-ips: cannot ask http://127.0.0.1:9/v1/egress-ips:")
