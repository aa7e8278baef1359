"""The ``egressgw`` command: run the gateway daemon or the agent of a worker node, check
policies, answer operators' questions, clean up a node, drive the lab."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from egressgw import __version__
from egressgw.logs import FORMATS, LEVELS

if TYPE_CHECKING:
    from egressgw.agent import AgentSettings
    from egressgw.app import KubeSettings
    from egressgw.datapath.tunnel import TunnelSettings
    from egressgw.policy.model import IPAddress, IPNetwork
    from egressgw.runtime import Settings


class Program(Protocol):
    """What ``app`` builds: a gateway or an agent."""

    async def run(self) -> int: ...


class Parser(argparse.ArgumentParser):
    """An argument parser whose mistakes are one line: what is wrong, and where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def host_port(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` or ``[IPv6]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected ADDR:PORT, got {text!r}")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{host!r} is not an IP address") from None
    return host, int(port)


def _whole_number(text: str, least: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1, "a positive number")


def natural_int(text: str) -> int:
    """A whole number, 0 or more."""
    return _whole_number(text, 0, "0 or more")


def address(text: str) -> IPAddress:
    """An IPv4 or IPv6 address."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def network(text: str) -> IPNetwork:
    """A network with its prefix length and no host bits: ``192.0.2.0/24``."""
    if "/" not in text:
        raise argparse.ArgumentTypeError(
            f"expected a network with its prefix length, such as 192.0.2.0/24, got {text!r}"
        )
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a network such as 192.0.2.0/24, got {text!r}"
        ) from None
    raise argparse.ArgumentTypeError(f"{text!r} has host bits set: did you mean {loose}?")


def port_number(text: str) -> int:
    value = _whole_number(text, 1, "a port from 1 to 65535")
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {value}")
    return value


def vni(text: str) -> int:
    """A VXLAN network identifier: 24 bits."""
    value = _whole_number(text, 1, "a VNI from 1 to 16777215")
    if value > 0xFFFFFF:
        raise argparse.ArgumentTypeError(f"expected a VNI from 1 to 16777215, got {value}")
    return value


def interface_name(text: str) -> str:
    """A Linux interface name: 1 to 15 bytes, no '/', ':' or white space, not '.' or '..'."""
    if (
        not 0 < len(text.encode()) < 16
        or text in (".", "..")
        or any(c in "/:" or c.isspace() for c in text)
    ):
        raise argparse.ArgumentTypeError(
            f"invalid interface name {text!r}: 1 to 15 characters, no '/', ':' or spaces"
        )
    return text


def domain(text: str) -> str:
    """A DNS name (no wildcard, not the root), canonical: lower case, no trailing dot; every
    name under it is included."""
    from egressgw.policy.fqdn import InvalidName, canonical_name

    try:
        return canonical_name(text)
    except InvalidName as exc:
        raise argparse.ArgumentTypeError(f"invalid domain {text!r}: {exc}") from None


TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")


def table_name(text: str) -> str:
    """An nftables table name: letters, digits and '_', at most 32, not starting with a digit."""
    if not TABLE_NAME.match(text):
        raise argparse.ArgumentTypeError(
            f"invalid table name {text!r}: use letters, digits and '_' (at most 32), "
            "starting with a letter or '_'"
        )
    return text


def add_logging_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """--log-level and --log-format; after a subcommand they override the ones before it."""
    options = parser.add_argument_group("logging")
    options.add_argument(
        "--log-level",
        type=str.upper,
        choices=LEVELS,
        default="INFO" if top else argparse.SUPPRESS,
        help="show messages of this level and above (default: INFO); DEBUG adds every library's "
        "detail",
    )
    options.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text" if top else argparse.SUPPRESS,
        help="text: time level logger: message, values of decision lines quoted as needed; "
        "json: one object per line (time, level, logger, message, decision fields) "
        "(default: text)",
    )


def add_tunnel_options(parser: argparse.ArgumentParser, role: str) -> None:
    """--tunnel-device, --tunnel-vni and --tunnel-port; every node of a cluster uses the same."""
    from egressgw.datapath.tunnel import TunnelSettings

    default = TunnelSettings()
    tunnel = parser.add_argument_group(
        "tunnel", f"egressgw's own VXLAN tunnel between worker and gateway nodes ({role})"
    )
    tunnel.add_argument(
        "--tunnel-device",
        type=interface_name,
        default=default.device,
        metavar="NAME",
        help="name of the VXLAN interface on this node (default: %(default)s)",
    )
    tunnel.add_argument(
        "--tunnel-vni",
        type=vni,
        default=default.vni,
        metavar="VNI",
        help="VXLAN network identifier, 1 to 16777215, the same on every node; Flannel uses 1, "
        "Calico 4096 (default: %(default)s)",
    )
    tunnel.add_argument(
        "--tunnel-port",
        type=port_number,
        default=default.port,
        metavar="PORT",
        help="UDP port the tunnel's packets use, the same on every node; Flannel and Cilium "
        "use 8472, Calico 4789 (default: %(default)s)",
    )


def tunnel_of(args: argparse.Namespace) -> TunnelSettings:
    from egressgw.datapath.tunnel import TunnelSettings

    return TunnelSettings(device=args.tunnel_device, vni=args.tunnel_vni, port=args.tunnel_port)


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below ``parser``, depth first."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if sub not in found:
                    found += [sub, *_subparsers(sub)]
    return found


def settings_of(args: argparse.Namespace) -> Settings:
    """The daemon's Settings from ``egressgw run``'s arguments."""
    from egressgw.dns.interceptor import DnsSettings
    from egressgw.dns.wire import NXDOMAIN, REFUSED
    from egressgw.runtime import Settings

    dns = DnsSettings(
        min_ttl_s=args.min_ttl,
        max_ttl_s=args.max_ttl,
        grace_s=args.grace,
        program_timeout_s=args.program_timeout_ms / 1000,
        deny_rcode={"NXDOMAIN": NXDOMAIN, "REFUSED": REFUSED}[args.deny_rcode],
        negative_ttl_s=args.negative_ttl,
        passthrough_domains=tuple(args.passthrough_domain),
        max_addresses_per_name=args.max_addresses_per_name,
        max_addresses_per_identity=args.max_addresses_per_identity,
        rate_per_source_qps=args.rate_limit,
        burst_per_source=args.rate_limit * 2,
        log_allowed_per_second=args.log_allowed,
    )
    return Settings(
        uplink=args.uplink,
        manifests=Path(args.manifests) if args.manifests else None,
        table=args.table,
        http_listen=args.http_listen,
        dns_listen=tuple(args.dns_listen),
        upstreams=tuple(args.upstream),
        upstream_timeout_s=args.upstream_timeout_ms / 1000,
        dns=dns,
        netns=args.netns,
        node_name=args.node_name or "",
        netlink_buffer_bytes=args.netlink_buffer_bytes,
        dns_tcp_per_source=args.dns_tcp_per_source,
        dns_tcp_pipeline=args.dns_tcp_pipeline,
        tunnel=tunnel_of(args),
    )


def agent_settings_of(args: argparse.Namespace) -> AgentSettings:
    """The agent's Settings from ``egressgw agent``'s arguments."""
    from egressgw.agent import AgentSettings

    return AgentSettings(
        node_name=args.node_name or "",
        cluster_cidrs=tuple(args.cluster_cidr),
        dns_addresses=tuple(dict.fromkeys(args.dns_address)),
        manifests=Path(args.manifests) if args.manifests else None,
        http_listen=args.http_listen,
        tunnel=tunnel_of(args),
        table=args.table,
        netns=args.netns,
    )


def _kube_settings(args: argparse.Namespace, **extra: Any) -> KubeSettings | None:
    """Kubernetes mode's settings from the flags both commands share; None without it."""
    from egressgw.app import KubeSettings

    if not args.kubernetes:
        return None
    return KubeSettings(
        node_name=args.node_name or "",
        kubeconfig=Path(args.kubeconfig) if args.kubeconfig else None,
        lease_namespace=args.lease_namespace,
        **extra,
    )


def _serve(command: str, build: Callable[[], Program]) -> int:
    """Build the program and run it until it stops; a setting or host that cannot work is one
    line and exit status 2."""
    from egressgw.app import ConfigError
    from egressgw.runtime import StartupError

    try:
        program = build()
        return asyncio.run(program.run())
    except (ConfigError, StartupError) as exc:
        print(f"egressgw {command}: {exc}", file=sys.stderr)
        return 2


def _agent(args: argparse.Namespace) -> int:
    from egressgw import app

    kube = _kube_settings(args)
    return _serve("agent", lambda: app.build_agent(agent_settings_of(args), kube))


def _run(args: argparse.Namespace) -> int:
    from egressgw import app

    kube = _kube_settings(args, lease_duration_s=args.lease_duration)
    return _serve("run", lambda: app.build_gateway(settings_of(args), kube))


def _policy_check(args: argparse.Namespace) -> int:
    from egressgw.identity import IdentityRegistry
    from egressgw.plan import build
    from egressgw.policy.check import check_paths
    from egressgw.policy.model import Snapshot

    def conflicts(snapshot: Snapshot) -> list[str]:
        return build(snapshot, IdentityRegistry()).notes

    return check_paths(args.paths, strict=args.strict, conflicts=conflicts)


def _add_agent_parser(sub: Any) -> None:
    agent = sub.add_parser(
        "agent",
        help="run the agent of a worker node: steer selected pods to their gateway nodes",
        description="Run the agent of a worker node: the traffic of each pod on this node that "
        "an EgressGateway selects, toward anything outside the cluster CIDRs, and its DNS to "
        "the --dns-address addresses, go through egressgw's VXLAN tunnel to the gateway node "
        "that holds the gateway's egress IP of that address family; while none does, that "
        "traffic is dropped. Other pods and cluster-internal traffic are not touched. The "
        "kernel keeps steering while the agent is stopped. Exit status: 0 stopped by "
        "SIGTERM/SIGINT, 1 a task failed, 2 a setting or the host is not fit to start (one "
        "line says why).",
    )
    mode = agent.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--manifests",
        metavar="DIR",
        help="directory of Namespace, Pod (with spec.nodeName), Node and EgressGateway YAML, "
        "re-read when it changes; each gateway's egress IPs are held by the first Node, by "
        "name, its nodeSelector matches",
    )
    mode.add_argument(
        "--kubernetes",
        action="store_true",
        help="read this node's pods, the Namespaces, EgressGateways and Nodes from the API "
        "server, and the egress IPs' holders from their Leases",
    )
    agent.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME"),
        metavar="NAME",
        help="this node's name: its pods are steered, from its Node's InternalIP "
        "(default: $NODE_NAME)",
    )
    agent.add_argument(
        "--cluster-cidr",
        type=network,
        action="append",
        required=True,
        metavar="CIDR",
        help="a network inside the cluster: pods, services, nodes; traffic toward it is never "
        "steered; repeatable, at least one",
    )
    agent.add_argument(
        "--dns-address",
        type=address,
        action="append",
        default=[],
        metavar="ADDR",
        help="an address the pods send DNS to (the cluster DNS Service IP, NodeLocal "
        "DNSCache's address): DNS of steered pods to it, UDP and TCP port 53, goes to their "
        "gateway's interceptor, which answers as this address; repeatable (default: none, "
        "DNS is not steered)",
    )
    agent.add_argument(
        "--http-listen",
        type=host_port,
        metavar="ADDR:PORT",
        help="serve /healthz, /readyz and /metrics (default: none)",
    )
    agent.add_argument(
        "--table",
        type=table_name,
        default="egressgw_agent",
        metavar="NAME",
        help="nftables table (inet family) that marks what to steer (default: %(default)s)",
    )
    agent.add_argument(
        "--netns",
        metavar="NAME",
        help="for tests and labs only: program the steering in this network namespace (HTTP "
        "still listens where the process runs)",
    )
    add_tunnel_options(agent, "this worker node's end")
    kube = agent.add_argument_group("Kubernetes mode")
    kube.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="kubeconfig file (default: the in-cluster service account)",
    )
    kube.add_argument(
        "--lease-namespace",
        default="egressgw-system",
        metavar="NS",
        help="namespace of the egress IP Leases the gateways hold (default: %(default)s)",
    )
    agent.set_defaults(func=_agent)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="egressgw", description=__doc__)
    parser.add_argument("--version", action="version", version=f"egressgw {__version__}")
    add_logging_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the gateway daemon",
        description="Run the gateway daemon: hold the egress IPs, enforce the policies in "
        "nftables, answer the workloads' DNS. Exit status: 0 stopped by SIGTERM/SIGINT, 1 a "
        "task failed, 2 a setting or the host is not fit to start (one line says why).",
    )
    mode = run.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--manifests",
        metavar="DIR",
        help="directory of Namespace, Pod, EgressGateway and EgressPolicy YAML, re-read when "
        "it changes",
    )
    mode.add_argument(
        "--kubernetes",
        action="store_true",
        help="read the objects from the API server, write status, hold egress IPs by Lease",
    )
    kube = run.add_argument_group("Kubernetes mode")
    kube.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="kubeconfig file (default: the in-cluster service account)",
    )
    kube.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME"),
        metavar="NAME",
        help="this node's name, for Leases and nodeSelectors; with --manifests, the Node whose "
        "egress IPs this gateway holds and whose tunnel it terminates (manifests without any "
        "Node: every egress IP, no tunnel) (default: $NODE_NAME)",
    )
    kube.add_argument(
        "--lease-namespace",
        default="egressgw-system",
        metavar="NS",
        help="namespace of the egress IP Leases (default: %(default)s)",
    )
    kube.add_argument(
        "--lease-duration",
        type=positive_int,
        default=10,
        metavar="SECONDS",
        help="an egress IP moves to another node within this many seconds after its holder "
        "fails (default: %(default)s)",
    )
    run.add_argument(
        "--netns",
        metavar="NAME",
        help="for tests and labs only: program the datapath in this network namespace (HTTP and "
        "DNS still listen where the process runs)",
    )
    run.add_argument(
        "--uplink",
        required=True,
        metavar="IFACE",
        help="interface toward the external network; egress IPs are added here",
    )
    run.add_argument(
        "--http-listen",
        type=host_port,
        metavar="ADDR:PORT",
        help="serve /healthz, /readyz, /metrics and the operator API /v1/... (default: none)",
    )
    run.add_argument(
        "--table",
        type=table_name,
        default="egressgw",
        metavar="NAME",
        help="nftables table (inet family) holding the ruleset (default: %(default)s)",
    )
    run.add_argument(
        "--netlink-buffer-bytes",
        type=positive_int,
        default=32 * 1024 * 1024,
        metavar="BYTES",
        help="socket buffer asked for the nftables netlink socket (the kernel doubles it); a "
        "change larger than one buffer is applied in steps that never open before they close "
        "(default: %(default)s, 32 MiB)",
    )
    dns = run.add_argument_group("DNS interceptor")
    dns.add_argument(
        "--dns-listen",
        type=host_port,
        action="append",
        default=[],
        metavar="ADDR:PORT",
        help="answer workloads' DNS here, UDP and TCP; repeatable (default: no DNS)",
    )
    dns.add_argument(
        "--upstream",
        type=host_port,
        action="append",
        default=[],
        metavar="ADDR:PORT",
        help="resolver to forward allowed names to, tried in order; repeatable. One that is "
        "down or unreachable is demoted, never fatal",
    )
    dns.add_argument(
        "--upstream-timeout-ms",
        type=positive_int,
        default=1000,
        metavar="MS",
        help="milliseconds one upstream gets before the next is tried (default: %(default)s)",
    )
    dns.add_argument(
        "--min-ttl",
        type=positive_int,
        default=5,
        metavar="SECONDS",
        help="lowest TTL released to workloads, in seconds (default: %(default)s)",
    )
    dns.add_argument(
        "--max-ttl",
        type=positive_int,
        default=3600,
        metavar="SECONDS",
        help="highest TTL released to workloads, in seconds (default: %(default)s)",
    )
    dns.add_argument(
        "--negative-ttl",
        type=positive_int,
        default=60,
        metavar="SECONDS",
        help="seconds downstream caches may keep the NXDOMAIN of a denied name: the TTL of the "
        "SOA it carries (default: %(default)s)",
    )
    dns.add_argument(
        "--dns-tcp-per-source",
        type=positive_int,
        default=16,
        metavar="N",
        help="DNS-over-TCP connections one source address may hold at once; one more is closed "
        "at once (default: %(default)s)",
    )
    dns.add_argument(
        "--dns-tcp-pipeline",
        type=positive_int,
        default=16,
        metavar="N",
        help="queries of one DNS-over-TCP connection answered at once, each as it is ready "
        "(default: %(default)s)",
    )
    dns.add_argument(
        "--grace",
        type=positive_int,
        default=10,
        metavar="SECONDS",
        help="seconds a learned address outlives the TTL released with it (default: %(default)s)",
    )
    dns.add_argument(
        "--program-timeout-ms",
        type=positive_int,
        default=250,
        metavar="MS",
        help="answer SERVFAIL if programming the datapath takes more milliseconds than this "
        "(default: %(default)s)",
    )
    dns.add_argument(
        "--deny-rcode",
        choices=["NXDOMAIN", "REFUSED"],
        default="NXDOMAIN",
        help="response code of a denied name (default: %(default)s)",
    )
    dns.add_argument(
        "--passthrough-domain",
        type=domain,
        action="append",
        default=[],
        metavar="DOMAIN",
        help="forward names at or under DOMAIN to the upstream and release the answer without "
        "a policy decision or programming (e.g. cluster.local, which the cluster DNS answers "
        "and whose traffic stays in the cluster); repeatable (default: none)",
    )
    dns.add_argument(
        "--max-addresses-per-name",
        type=positive_int,
        default=64,
        metavar="N",
        help="addresses of one answer programmed and released; the rest are dropped from the "
        "answer (default: %(default)s)",
    )
    dns.add_argument(
        "--max-addresses-per-identity",
        type=positive_int,
        default=4096,
        metavar="N",
        help="destinations one workload identity may have learned; beyond it the oldest "
        "expiring are evicted (default: %(default)s)",
    )
    dns.add_argument(
        "--rate-limit",
        type=positive_int,
        default=500,
        metavar="QPS",
        help="queries per second per source address, bursts of twice that (default: %(default)s)",
    )
    dns.add_argument(
        "--log-allowed",
        type=natural_int,
        default=10,
        metavar="PER_SECOND",
        help="allowed DNS decisions logged at INFO, lines per second; the rest are counted in "
        "one line a second; 0: none (denials are always logged) (default: %(default)s)",
    )
    add_tunnel_options(run, "with --node-name: this gateway node's end")
    run.set_defaults(func=_run)

    _add_agent_parser(sub)

    policy = sub.add_parser("policy", help="work with EgressGateway and EgressPolicy files")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    check = policy_sub.add_parser(
        "check",
        help="validate manifests and report conflicts",
        description="Validate manifests: one line per problem, then the conflicts the daemon "
        "would log (two gateways selecting the same pods, an address claimed by two pods, an "
        "egress IP in two gateways). Exit status: 0 valid (conflicts are warnings), 1 a problem "
        "(or a conflict, with --strict) or no manifests found.",
    )
    check.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="manifest files, or directories read as the daemon reads them (*.yaml, *.yml);"
        " - reads standard input (kubectl get ... -o yaml | egressgw policy check -)",
    )
    check.add_argument(
        "--strict",
        action="store_true",
        help="conflicts are errors (exit status 1) instead of warnings",
    )
    check.set_defaults(func=_policy_check)

    from egressgw.tools import add_parsers as add_operator_parsers

    add_operator_parsers(sub)

    try:
        from egressgw.lab.cli import add_lab_parser
    except ImportError:  # the lab is optional at run time (e.g. in the container image)
        pass
    else:
        add_lab_parser(sub)
    for below in _subparsers(parser):
        add_logging_options(below, top=False)
    return parser


ALLOCATOR = "malloc"
"""Python's allocator for a gateway that intercepts DNS: the C library's, whose free pages
``malloc_trim`` hands back once a burst of queries is forgotten. Python's own small-object
allocator frees a 1 MiB arena only when nothing in it survives, so a few survivors per arena
keep most of a burst resident (``loadtest.fuzz``: 1.45x the starting RSS after the settle with
it, 1.08x without). Its price is the control plane's speed (``loadtest.scale``, 100,000 pods:
an edit in the kernel after 2.7 s instead of 2.2 s), so the agent and a gateway without DNS
keep Python's own."""


def daemon_environ(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to start ``egressgw ARGS`` over in, on its allocator; None when this
    process will do: not a gateway that intercepts DNS, or ``PYTHONMALLOC`` already chosen (an
    operator's ``pymalloc`` or ``debug`` stays theirs)."""
    if args.command != "run" or not args.dns_listen or "PYTHONMALLOC" in environ:
        return None
    return {**environ, "PYTHONMALLOC": ALLOCATOR}


def entry() -> int:
    """The ``egressgw`` program: a gateway that intercepts DNS starts over once, on its
    allocator, with the same interpreter flags and arguments (``sys.orig_argv``) and the same
    process ID."""
    args = build_parser().parse_args()
    environ = daemon_environ(args, dict(os.environ))
    if environ is not None:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    return main()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from egressgw.logs import configure

    configure(args.log_level, args.log_format)
    result: int = args.func(args)
    return result
