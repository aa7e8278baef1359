"""An operator's first hour: mistakes are one line and exit 2, help says what each flag does,
conflicts are reported before the daemon runs, logs stay parseable, and the lab and the
Makefile do what they say."""

from __future__ import annotations

import argparse
import io
import logging
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from egressgw import app, logs
from egressgw.cli import _subparsers, build_parser, daemon_environ
from egressgw.datapath.skeleton import SkeletonError
from egressgw.lab.cli import usage
from egressgw.runtime import Settings, adopt_problem, has_capability
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[2]

CONFLICTS = """\
apiVersion: v1
kind: Namespace
metadata: {name: payments, labels: {project: payments}}
---
apiVersion: v1
kind: Pod
metadata: {name: api-0, namespace: payments, labels: {app: api}}
status: {podIPs: [{ip: 192.0.2.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: payments, labels: {app: api}}
status: {podIPs: [{ip: 192.0.2.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-2, namespace: payments, labels: {app: api}}
status: {podIPs: [{ip: 192.0.2.11}]}
---
apiVersion: egressgw.io/v1alpha1
kind: EgressGateway
metadata: {name: payments}
spec:
  namespaceSelector: {matchLabels: {project: payments}}
  egressIPs: ["198.51.100.10"]
---
apiVersion: egressgw.io/v1alpha1
kind: EgressGateway
metadata: {name: payments-too}
spec:
  namespaceSelector: {matchLabels: {project: payments}}
  egressIPs: ["198.51.100.11"]
"""


@pytest.fixture(autouse=True)
def _logging_as_before() -> Iterator[None]:
    """``main`` configures logging for the whole process: put it back afterwards."""
    yield
    logs.configure("INFO", "text")


run = run_cli


# -- mistakes: one line, exit 2 ---------------------------------------------------------------


@pytest.mark.parametrize("table", ["bad name!", "9lives", "x" * 33, "a-b"])
def test_a_bad_table_name_is_one_line_at_parse_time(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, table: str
) -> None:
    code, out, err = run(
        capsys, "run", "--manifests", str(tmp_path), "--uplink", "up0", "--table", table
    )
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"egressgw run: argument --table: invalid table name {table!r}: use letters, digits "
        "and '_' (at most 32), starting with a letter or '_' (see egressgw run --help)"
    ]


def test_a_missing_network_namespace_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["run", "--manifests", str(tmp_path), "--uplink", "up0", "--netns", "egt-no-such-ns"]
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "egressgw run: --netns egt-no-such-ns: no such network namespace "
        "(`ip netns list` lists them)"
    ]


def test_a_missing_required_flag_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "run", "--manifests", "/nonexistent")
    assert code == 2
    assert err.splitlines() == [
        "egressgw run: the following arguments are required: --uplink (see egressgw run --help)"
    ]


def test_egress_ips_from_a_missing_directory_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "nope"
    code, out, err = run(capsys, "egress-ips", "--manifests", str(missing))
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"egressgw egress-ips: --manifests {missing}: no such file or directory"
    ]
    argv = ["--namespace", "payments", "--pod", "api-0", "--host", "db.example.com"]
    code, out, err = run(capsys, "explain", *argv, "--manifests", str(missing))
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"egressgw explain: --manifests {missing}: no such file or directory"
    ]


def test_cleanup_refuses_a_bad_table_name(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "cleanup", "--table", "no-dashes")
    assert code == 2 and len(err.splitlines()) == 1 and "invalid table name" in err


def test_start_up_failures_of_the_kernel_are_named_in_one_line() -> None:
    settings = Settings(uplink="up0", table="counter")
    keyword = SkeletonError(
        "nft refused the ruleset of table counter: /dev/stdin:1:16-22: Error: syntax error, "
        "unexpected counter, expecting string\nadd table inet counter {"
    )
    assert str(adopt_problem(settings, keyword)) == (
        "--table counter: nft reads this name as a keyword; choose another"
    )
    settings = Settings(uplink="up0")
    denied = SkeletonError(
        "nft refused the ruleset of table egressgw: netlink: Error: cache initialization "
        "failed: Operation not permitted"
    )
    assert "CAP_NET_ADMIN" in str(adopt_problem(settings, denied))
    missing = SkeletonError(
        "nft refused the ruleset of table egressgw: Error: Could not process rule: "
        "Operation not supported\nadd table inet egressgw"
    )
    problem = str(adopt_problem(settings, missing))
    assert problem.startswith("nftables not available in this kernel") and "\n" not in problem


def test_the_capability_is_read_from_the_process_status(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000001000\n")
    assert has_capability(12, status)
    status.write_text("Name:\tx\nCapEff:\t0000000000000000\n")
    assert not has_capability(12, status)


def test_start_up_errors_from_the_daemon_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from egressgw.runtime import StartupError

    class Failing:
        def __init__(self, settings: Settings, kube: object = None) -> None:
            pass

        async def run(self) -> int:
            raise StartupError("--http-listen 127.0.0.1:9460: address already in use")

    monkeypatch.setattr(app, "build_gateway", Failing)
    code, out, err = run(capsys, "run", "--manifests", str(tmp_path), "--uplink", "up0")
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "egressgw run: --http-listen 127.0.0.1:9460: address already in use"
    ]


# -- policy check: the conflicts the daemon would log -----------------------------------------


def test_policy_check_reports_conflicts_as_warnings_and_fails_on_them_with_strict(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "cluster.yaml").write_text(CONFLICTS)
    code, out, _ = run(capsys, "policy", "check", str(tmp_path))
    assert code == 0
    lines = out.splitlines()
    assert lines == [
        f"{tmp_path}: warning: address 192.0.2.10 is claimed by pods payments/api-0, "
        "payments/api-1; it belongs to none of them",
        lines[1],
        f"{tmp_path}: 6 objects, all valid, 2 conflicts (warnings)",
    ]
    assert lines[1].startswith(f"{tmp_path}: warning: pods of namespace payments")
    assert "selected by EgressGateways payments, payments-too; using payments" in lines[1]

    code, out, _ = run(capsys, "policy", "check", "--strict", str(tmp_path))
    assert code == 1
    assert [line.split(": ")[1] for line in out.splitlines()[:2]] == ["error", "error"]
    assert out.splitlines()[-1] == f"{tmp_path}: 6 objects, all valid, 2 conflicts"


def test_policy_check_of_the_example_policies_is_clean_even_when_strict(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, "policy", "check", "--strict", str(REPO / "policies"))
    assert (code, out) == (0, f"{REPO / 'policies'}: 4 objects, all valid\n")


# -- logging options after the subcommand, quoting, allowed decisions -------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "DEBUG", "egress-ips", "--manifests", "MANIFESTS"],
        ["egress-ips", "--log-level", "DEBUG", "--manifests", "MANIFESTS"],
        [
            "--log-level",
            "WARNING",
            "egress-ips",
            "--log-level",
            "debug",
            "--manifests",
            "MANIFESTS",
        ],
    ],
)
def test_log_options_are_accepted_before_and_after_the_subcommand(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]
) -> None:
    (tmp_path / "cluster.yaml").write_text(CONFLICTS)
    argv = [str(tmp_path) if a == "MANIFESTS" else a for a in argv]
    code, _, _ = run(capsys, *argv)
    assert code == 0
    assert logging.getLogger().level == logging.DEBUG


def test_log_options_after_run_reach_the_daemon(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, int]] = []

    class Recorder:
        def __init__(self, settings: Settings, kube: object = None) -> None:
            seen.append((logging.getLogger().level, settings.dns.log_allowed_per_second))

        async def run(self) -> int:
            return 0

    monkeypatch.setattr(app, "build_gateway", Recorder)
    base = ["run", "--manifests", str(tmp_path), "--uplink", "up0"]
    assert run(capsys, *base, "--log-level", "WARNING", "--log-format", "json")[0] == 0
    assert run(capsys, *base, "--log-allowed", "0")[0] == 0
    assert seen == [(logging.WARNING, 10), (logging.INFO, 0)]


def decision(reason: str, name: str = "db.example.com", verdict: str = "deny") -> dict[str, object]:
    return {
        "event": "dns decision",
        "identity": "payments/api-0",
        "namespace": "payments",
        "pod": "api-0",
        "source": None,
        "name": name,
        "type": "A",
        "verdict": verdict,
        "reason": reason,
        "rule": None,
        "addresses": ["203.0.113.10", "2001:db8::10"],
    }


def test_text_decision_lines_keep_every_value_one_field() -> None:
    stream = io.StringIO()
    logs.configure("INFO", "text", stream)
    reason = 'no rule matches "evil name" = yes \\ really'
    logging.getLogger("egressgw.dns").info(
        "ignored", extra={"decision": decision(reason, name="we ird\\.name")}
    )
    (line,) = stream.getvalue().splitlines()
    message = line.split("egressgw.dns: ", 1)[1]
    assert message.startswith("dns decision identity=payments/api-0 ")
    fields = dict(part.split("=", 1) for part in shlex.split(message)[2:])
    assert fields == {
        "identity": "payments/api-0",
        "name": "we ird\\.name",
        "type": "A",
        "verdict": "deny",
        "reason": reason,
        "rule": "-",
        "addresses": "203.0.113.10,2001:db8::10",
    }
    assert 'reason="no rule matches \\"evil name\\" = yes \\\\ really"' in message


# -- help: every flag says what it does, its unit and its default -----------------------------


def _every_parser() -> list[argparse.ArgumentParser]:
    parser = build_parser()
    return [parser, *_subparsers(parser)]


def test_every_flag_of_every_command_has_help_with_its_default() -> None:
    checked = 0
    for parser in _every_parser():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                continue
            where = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{where} has no help"
            default = action.default
            shows = "%(default)s" in action.help or "default:" in action.help
            if default not in (None, False, [], argparse.SUPPRESS):
                assert shows, f"{where}: the help does not show the default {default!r}"
            checked += 1
    assert checked > 50


def test_help_names_units(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "run", "--help")
    assert code == 0
    text = " ".join(out.split())
    for expected in (
        "--lease-duration SECONDS an egress IP moves to another node within this many seconds",
        "--upstream-timeout-ms MS milliseconds one upstream gets before the next is tried "
        "(default: 1000)",
        "--table NAME nftables table (inet family) holding the ruleset (default: egressgw)",
        "--rate-limit QPS queries per second per source address",
        "--log-level {DEBUG,INFO,WARNING,ERROR}",
    ):
        assert expected in text


# -- the lab prints commands that run as written ----------------------------------------------


def test_lab_usage_prints_operator_commands_for_the_lab() -> None:
    text = usage("egl", Path("/run/egressgw-lab/egl"))
    commands = [line.split(":  ", 1)[-1].split("   #")[0].strip() for line in text.splitlines()]
    joined = "\n".join(commands)
    assert "policy check /run/egressgw-lab/egl/manifests" in joined
    assert (
        "explain --manifests /run/egressgw-lab/egl/manifests --namespace payments --pod api-0 "
        "--host db.lab.example --port 5432"
    ) in joined
    # The daemon commands run inside the gateway nodes: analytics' question is asked of the node
    # that holds its egress IPs (gateway-2), the egress IPs of gateway-1 (payments').
    assert "ip netns exec egl-gateway-1 " in joined
    assert any(
        line.startswith("ip netns exec egl-gateway-2 ") and "--namespace analytics" in line
        for line in commands
    ), commands
    assert any(
        line.startswith("ip netns exec egl-gateway-1 ")
        and "egress-ips --url http://127.0.0.1:9460" in line
        for line in commands
    ), commands
    assert "curl -s 'http://127.0.0.1:9460/v1/decisions?limit=5'" in joined
    assert "lab down --name egl" in joined
    without = usage("egl", Path("/run/egressgw-lab/egl"), daemon=False)
    assert "--url" not in without


# -- make demo installs what the demo needs, make test everything -----------------------------


def _make(target: str, tmp_path: Path) -> str:
    if shutil.which("make") is None:
        pytest.skip("needs make")
    proc = subprocess.run(
        ["make", "-n", "-C", str(REPO), target, f"VENV={tmp_path / 'venv'}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_demo_installs_only_what_the_lab_runs(tmp_path: Path) -> None:
    planned = _make("demo", tmp_path)
    for needed in ("nftables", "iproute2", "dnsmasq-base", "postgresql", "curl"):
        assert f" {needed} " in planned, needed
    for unneeded in ("prometheus", "dnsperf", "unbound", "iperf3", "[test]", "ruff", "mypy"):
        assert unneeded not in planned, unneeded
    assert "pip install -q -e ." in planned
    assert "egressgw lab demo" in planned


def test_make_test_installs_what_the_tests_need(tmp_path: Path) -> None:
    planned = _make("test", tmp_path)
    for needed in ("nftables", "dnsmasq-base", "postgresql", "unbound", "dnsperf", "prometheus"):
        assert f" {needed} " in planned, needed
    assert "-e '.[test]'" in planned
    assert "pytest" in planned


# -- a gateway node: tunnel flags, passthrough domains ----------------------------------------


def test_tunnel_and_passthrough_flags_of_run_reach_the_daemon(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from egressgw.datapath.tunnel import TunnelSettings

    seen: list[Settings] = []

    class Recorder:
        def __init__(self, settings: Settings, kube: object = None) -> None:
            seen.append(settings)

        async def run(self) -> int:
            return 0

    monkeypatch.setattr(app, "build_gateway", Recorder)
    argv = ["run", "--manifests", str(tmp_path), "--uplink", "up0", "--node-name", "gw-a"]
    argv += ["--tunnel-vni", "42", "--tunnel-port", "4790", "--tunnel-device", "egwx"]
    argv += ["--passthrough-domain", "Cluster.Local.", "--passthrough-domain", "svc.example"]
    assert run(capsys, *argv)[0] == 0
    (settings,) = seen
    assert settings.node_name == "gw-a"
    assert settings.tunnel == TunnelSettings(device="egwx", vni=42, port=4790)
    assert settings.dns.passthrough_domains == ("cluster.local", "svc.example")
    assert run(capsys, "run", "--manifests", str(tmp_path), "--uplink", "up0")[0] == 0
    assert seen[1].tunnel == TunnelSettings()


@pytest.mark.parametrize(
    ("domain", "why"),
    [(".", "the DNS name is empty"), ("*.cluster.local", 'label "*" has invalid characters')],
)
def test_a_passthrough_domain_that_is_no_name_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, domain: str, why: str
) -> None:
    argv = ["run", "--manifests", str(tmp_path), "--uplink", "up0"]
    code, out, err = run(capsys, *argv, "--passthrough-domain", domain)
    assert (code, out) == (2, "")
    (line,) = err.splitlines()
    assert line.startswith(
        f"egressgw run: argument --passthrough-domain: invalid domain {domain!r}"
    )
    assert why in line and line.endswith("(see egressgw run --help)")


def test_a_gateway_node_with_an_upstream_needs_a_dns_listen_address(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["run", "--manifests", str(tmp_path), "--uplink", "up0", "--node-name", "gw-a"]
    code, out, err = run(capsys, *argv, "--upstream", "192.0.2.53:53")
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "egressgw run: --upstream on a gateway node needs --dns-listen: the DNS that comes "
        "through the tunnel is answered there"
    ]


def test_run_help_names_the_tunnel_flags_with_their_units(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, "run", "--help")
    assert code == 0
    text = " ".join(out.split())
    for expected in (
        "--tunnel-device NAME name of the VXLAN interface on this node (default: egw0)",
        "--tunnel-vni VNI VXLAN network identifier, 1 to 16777215",
        "--tunnel-port PORT UDP port the tunnel's packets use",
        "--passthrough-domain DOMAIN forward names at or under DOMAIN to the upstream",
    ):
        assert expected in text, expected


def test_only_a_gateway_that_intercepts_dns_starts_over_on_the_c_allocator() -> None:
    plain = {"PATH": "/usr/bin"}

    def environ(*argv: str, env: dict[str, str] = plain) -> dict[str, str] | None:
        return daemon_environ(build_parser().parse_args(argv), env)

    gateway = ("run", "--manifests", "m", "--uplink", "up0")
    dns = ("--dns-listen", "192.0.2.53:53")
    assert environ(*gateway, *dns) == {"PATH": "/usr/bin", "PYTHONMALLOC": "malloc"}
    assert environ(*gateway, *dns, env={**plain, "PYTHONMALLOC": "pymalloc"}) is None  # theirs
    assert environ(*gateway) is None  # no DNS bursts to give back: the faster allocator stays
    agent = ("agent", "--manifests", "m", "--node-name", "w1", "--cluster-cidr", "192.0.2.0/24")
    assert environ(*agent) is None
    assert environ("policy", "check", "m") is None


def test_a_daemons_bad_flag_is_one_line_before_it_starts_over() -> None:
    environ = {"PATH": "/usr/bin:/bin"}
    argv = [sys.executable, "-m", "egressgw", "run", "--uplink"]
    done = subprocess.run(argv, capture_output=True, text=True, env=environ, cwd=REPO, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--uplink" in done.stderr, done.stderr
