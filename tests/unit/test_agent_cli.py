"""`egressgw agent` as an operator meets it: each mistake is one line and exit status 2, the
flags reach the agent as given, and `cleanup --agent` says what it cannot do in one line."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest

from egressgw import app, logs
from egressgw.agent import AgentSettings
from egressgw.datapath.tunnel import TunnelSettings
from egressgw.runtime import StartupError
from tests.conftest import run_cli


@pytest.fixture(autouse=True)
def _as_before(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No NODE_NAME from the environment; logging put back after ``main`` configured it."""
    monkeypatch.delenv("NODE_NAME", raising=False)
    yield
    logs.configure("INFO", "text")


run = run_cli


def agent_args(manifests: Path, *extra: str) -> list[str]:
    return ["agent", "--manifests", str(manifests), "--node-name", "w1", *extra]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ((), "the following arguments are required: --cluster-cidr"),
        (
            ("--cluster-cidr", "192.0.2.1/24"),
            "argument --cluster-cidr: '192.0.2.1/24' has host bits set: did you mean 192.0.2.0/24?",
        ),
        (
            ("--cluster-cidr", "192.0.2.0"),
            "argument --cluster-cidr: expected a network with its prefix length, such as "
            "192.0.2.0/24, got '192.0.2.0'",
        ),
        (
            ("--cluster-cidr", "pods"),
            "argument --cluster-cidr: expected a network with its prefix length, such as "
            "192.0.2.0/24, got 'pods'",
        ),
        (
            ("--cluster-cidr", "192.0.2.0/33"),
            "argument --cluster-cidr: expected a network such as 192.0.2.0/24, got '192.0.2.0/33'",
        ),
        (
            ("--cluster-cidr", "192.0.2.0/24", "--dns-address", "192.0.2.300"),
            "argument --dns-address: '192.0.2.300' is not an IP address",
        ),
        (
            ("--cluster-cidr", "192.0.2.0/24", "--tunnel-vni", "16777216"),
            "argument --tunnel-vni: expected a VNI from 1 to 16777215, got 16777216",
        ),
        (
            ("--cluster-cidr", "192.0.2.0/24", "--tunnel-port", "0"),
            "argument --tunnel-port: expected a port from 1 to 65535, got 0",
        ),
        (
            ("--cluster-cidr", "192.0.2.0/24", "--tunnel-device", "a-name-far-too-long"),
            "argument --tunnel-device: invalid interface name 'a-name-far-too-long': 1 to 15 "
            "characters, no '/', ':' or spaces",
        ),
    ],
)
def test_a_mistake_in_a_flag_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: tuple[str, ...], expected: str
) -> None:
    code, out, err = run(capsys, *agent_args(tmp_path, *extra))
    assert (code, out) == (2, "")
    assert err.splitlines() == [f"egressgw agent: {expected} (see egressgw agent --help)"]


def test_a_missing_node_name_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["agent", "--manifests", str(tmp_path), "--cluster-cidr", "192.0.2.0/24"]
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "egressgw agent: --node-name is needed (or NODE_NAME): the agent steers this node's pods"
    ]


def test_a_missing_manifests_directory_and_namespace_are_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "nope"
    code, _, err = run(capsys, *agent_args(missing, "--cluster-cidr", "192.0.2.0/24"))
    assert code == 2
    assert err.splitlines() == [f"egressgw agent: --manifests {missing} is not a directory"]
    argv = agent_args(tmp_path, "--cluster-cidr", "192.0.2.0/24", "--netns", "egt-no-such-ns")
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.splitlines() == [
        "egressgw agent: --netns egt-no-such-ns: no such network namespace "
        "(`ip netns list` lists them)"
    ]


def test_a_missing_source_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "agent", "--node-name", "w1", "--cluster-cidr", "198.51.100.0/24")
    assert code == 2
    assert err.splitlines() == [
        "egressgw agent: one of the arguments --manifests --kubernetes is required "
        "(see egressgw agent --help)"
    ]


def test_the_flags_reach_the_agent_as_given(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[AgentSettings, object]] = []

    class Recorder:
        def __init__(self, settings: AgentSettings, kube: object = None) -> None:
            seen.append((settings, kube))

        async def run(self) -> int:
            return 0

    monkeypatch.setattr(app, "build_agent", Recorder)
    monkeypatch.setenv("NODE_NAME", "w7")
    argv = [
        "agent",
        "--manifests",
        str(tmp_path),
        *("--cluster-cidr", "192.0.2.0/24", "--cluster-cidr", "2001:db8:96::/112"),
        *("--dns-address", "198.51.100.53", "--dns-address", "203.0.113.53"),
        *("--dns-address", "198.51.100.53"),
        *("--tunnel-vni", "42", "--tunnel-port", "4790", "--tunnel-device", "egwx"),
        *("--http-listen", "127.0.0.1:9461", "--table", "agent_t"),
    ]
    assert run(capsys, *argv)[0] == 0
    ((settings, kube),) = seen
    assert kube is None
    assert settings == AgentSettings(
        node_name="w7",
        cluster_cidrs=(
            ipaddress.ip_network("192.0.2.0/24"),
            ipaddress.ip_network("2001:db8:96::/112"),
        ),
        dns_addresses=(ipaddress.ip_address("198.51.100.53"), ipaddress.ip_address("203.0.113.53")),
        manifests=tmp_path,
        http_listen=("127.0.0.1", 9461),
        tunnel=TunnelSettings(device="egwx", vni=42, port=4790),
        table="agent_t",
    )


def test_kubernetes_mode_gets_the_node_and_the_lease_namespace(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[object] = []

    class Recorder:
        def __init__(self, settings: AgentSettings, kube: object = None) -> None:
            seen.append(kube)

        async def run(self) -> int:
            return 0

    monkeypatch.setattr(app, "build_agent", Recorder)
    argv = ["agent", "--kubernetes", "--node-name", "w1", "--cluster-cidr", "198.51.100.0/24"]
    assert run(capsys, *argv, "--lease-namespace", "egw")[0] == 0
    assert seen == [app.KubeSettings(node_name="w1", lease_namespace="egw")]


def test_a_start_up_failure_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Failing:
        def __init__(self, settings: AgentSettings, kube: object = None) -> None:
            pass

        async def run(self) -> int:
            raise StartupError("--http-listen 127.0.0.1:9461: address already in use")

    monkeypatch.setattr(app, "build_agent", Failing)
    code, out, err = run(capsys, *agent_args(tmp_path, "--cluster-cidr", "198.51.100.0/24"))
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "egressgw agent: --http-listen 127.0.0.1:9461: address already in use"
    ]


def test_help_says_what_each_flag_does_with_its_unit_and_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, "agent", "--help")
    assert code == 0
    text = " ".join(out.split())
    for expected in (
        "--cluster-cidr CIDR a network inside the cluster: pods, services, nodes; traffic "
        "toward it is never steered",
        "--dns-address ADDR an address the pods send DNS to",
        "--tunnel-vni VNI VXLAN network identifier, 1 to 16777215",
        "(default: 7795)",
        "--tunnel-port PORT UDP port",
        "--table NAME nftables table (inet family) that marks what to steer "
        "(default: egressgw_agent)",
        "--node-name NAME this node's name",
        "(default: $NODE_NAME)",
        "--lease-namespace NS namespace of the egress IP Leases the gateways hold "
        "(default: egressgw-system)",
        "--log-level {DEBUG,INFO,WARNING,ERROR}",
    ):
        assert expected in text, expected


def test_cleanup_of_the_agent_refuses_an_uplink_and_a_missing_namespace(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, "cleanup", "--agent", "--uplink", "eth0")
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "egressgw cleanup: --uplink is the gateway's; the agent has no egress IPs"
    ]
    code, out, err = run(capsys, "cleanup", "--agent", "--netns", "egt-no-such-ns")
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "egressgw cleanup: --netns egt-no-such-ns: no such network namespace "
        "(`ip netns list` lists them)"
    ]


def test_cleanup_of_the_agent_removes_its_state_and_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from egressgw import tools
    from egressgw.testing.agent import FakeAgentDatapath

    datapath = FakeAgentDatapath()
    built: list[tuple[object, ...]] = []

    def fake_datapath(*args: object) -> FakeAgentDatapath:
        built.append(args)
        return datapath

    monkeypatch.setattr(app, "agent_datapath", fake_datapath)
    monkeypatch.setattr(tools, "_check_host", lambda netns: None)
    found = [True]
    monkeypatch.setattr(tools, "_agent_state_found", lambda table, device, netns: found[0])
    code, out, err = run(capsys, "cleanup", "--agent", "--tunnel-device", "egwx")
    assert (code, out, err) == (0, "removed everything\n", "")
    assert datapath.calls == ["remove"]
    assert built == [(TunnelSettings(device="egwx"), (), (), "egressgw_agent", None)]
    found[0] = False
    code, out, err = run(capsys, "cleanup", "--agent", "--table", "agent_t")
    assert (code, err) == (0, "")
    assert out == "no nftables table inet agent_t and no device egw0: nothing to remove\n"
